"""The search space file of ``shardrec tune``: the job's own keys, each with a distribution.

::

    train.dense_optimizer.lr: {loguniform: [1.0e-4, 1.0e-1]}
    model.mlp.dropout: {uniform: [0.0, 0.5]}
    features.tables.*.embedding_dim: {choice: [8, 16, 32]}   # '*': every item of a list
    data.batch_size: {randint: [128, 512]}                   # both ends included
    train.seed: {grid: [0, 1]}                               # every value, crossed with the samples

Every key is checked against the job before anything starts: it must name a key the job has (a
value at each end of a range and every listed value are put into the job and the job is built, so
a wrong type or a value the section rejects is an error too), and every range must be well formed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from shardrec.config import build, read_yaml_file
from shardrec.errors import ConfigError
from shardrec.job import JobConfig

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass(frozen=True)
class Dimension:
    """One searched key: its dotted path in the job, the distribution and its arguments."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def probes(self) -> list[Any]:
        """Values that must all make a valid job: both ends of a range, every listed value."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [low, high]
        # A value off the ends too (rarely a whole number): a float range over an int key fails here.
        inside = math.exp(math.log(low) + 0.37 * (math.log(high) - math.log(low))) if self.kind == "loguniform" else low + 0.37 * (high - low)
        return [low, high, inside]


def read_space(path: Path) -> list[Dimension]:
    """The dimensions of the space file ``path``, each well formed (not yet checked against a job)."""
    data = read_yaml_file(path, kind="search space file", fix="pass a YAML file of 'key: {distribution: args}'")
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"search space file '{path}' must map job keys to distributions, e.g. "
                          "'train.dense_optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}'")
    return [_dimension(path, str(key), spec) for key, spec in data.items()]


def _dimension(path: Path, key: str, spec: Any) -> Dimension:
    where = f"search space file '{path}', key '{key}'"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: give one distribution as a mapping, e.g. {{uniform: [0.0, 0.5]}}; one of {', '.join(KINDS)}")
    ((kind, args),) = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown distribution '{kind}'; use one of {', '.join(KINDS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: '{kind}' takes a non-empty list of values, got {args!r}")
        return Dimension(key, kind, tuple(args))
    if not isinstance(args, list) or len(args) != 2 or not all(_number(a) for a in args):
        raise ConfigError(f"{where}: '{kind}' takes [low, high], two numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}: '{kind}' needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: 'loguniform' needs low > 0 (a log scale), got {low}; use 'uniform' to include 0")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: 'randint' takes whole numbers [low, high] (both included), got {args!r}")
    return Dimension(key, kind, (low, high))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Sets the dotted ``key`` in the job dict ``data``; ``*`` stands for every item of a list
    (``features.tables.*.embedding_dim``). Missing sections are created (the job's build then
    names a key it does not have)."""
    _set(data, key.split("."), value, key)


def _set(node: Any, parts: list[str], value: Any, key: str) -> None:
    head, rest = parts[0], parts[1:]
    if head == "*":
        if not isinstance(node, list) or not node:
            raise ConfigError(f"search space key '{key}': '*' must stand for the items of a non-empty list in the job")
        if rest:
            for item in node:
                _set(item, rest, value, key)
        else:
            node[:] = [copy.deepcopy(value) for _ in node]
        return
    if not isinstance(node, dict):
        raise ConfigError(f"search space key '{key}': '{head}' is inside a {type(node).__name__}, not a section; "
                          "address list items with '*'")
    if not rest:
        node[head] = copy.deepcopy(value)
        return
    child = node.setdefault(head, {})
    if isinstance(child, str | int | float | bool) or child is None:
        raise ConfigError(f"search space key '{key}': '{head}' holds a value, not a section")
    _set(child, rest, value, key)


def with_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the job dict ``base`` with each dotted key of ``params`` set."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_key(data, key, value)
    return data


def check_against(dims: list[Dimension], base: dict[str, Any], *, space: Path) -> None:
    """Raises a ConfigError naming the space file and key when a probe value of a dimension makes
    the job invalid (an unknown key, a wrong type, a value the section rejects)."""
    for dim in dims:
        for value in dim.probes():
            try:
                build(JobConfig, with_params(base, {dim.key: value}), key="")
            except ConfigError as e:
                raise ConfigError(f"search space file '{space}', key '{dim.key}' = {value!r}: {e}") from None
