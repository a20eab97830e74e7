"""Typed configs from YAML: dataclass trees built from nested dicts with errors that name the key.

Every component declares a ``@dataclass(kw_only=True)`` config. :func:`build` turns a plain dict
(from YAML) into that dataclass, recursing into nested dataclasses and lists of them, checking
types and ``Literal`` choices, and rejecting unknown keys with the list of valid ones.
:func:`apply_overrides` applies ``section.key=value`` strings from the command line first.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from shardrec.errors import ConfigError

T = TypeVar("T")


def build(cls: type[T], data: Any, *, key: str) -> T:
    """Builds dataclass ``cls`` from ``data``, a dict; ``key`` is its dotted path for messages."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{key}' must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{_join(key, unknown[0])}'; valid keys under '{key or 'the top level'}' "
            f"are: {', '.join(sorted(fields))}"
        )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = convert(hints[name], _over_default(fields[name], value), key=_join(key, name))
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing config key '{_join(key, missing[0])}' (required)")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid '{key}': {e}") from e


def _over_default(f: dataclasses.Field[Any], value: Any) -> Any:
    """A partial section of a field whose default is a dataclass instance keeps that instance's
    other keys: ``loss: {temperature: 0.1}`` on a field defaulting to a sampled loss stays sampled."""
    if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            return {**{g.name: getattr(default, g.name) for g in dataclasses.fields(default) if g.init}, **value}
    return value


def convert(tp: Any, value: Any, *, key: str) -> Any:
    """Converts ``value`` to type ``tp`` or raises a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, key=key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"invalid value {value!r} for '{key}': {'; '.join(errors)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"invalid value {value!r} for '{key}'; valid choices: {', '.join(map(str, choices))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [convert(item_tp, v, key=f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: convert(val_tp, v, key=f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key=key)
    return _scalar(tp, value, key=key)


def _scalar(tp: Any, value: Any, *, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads exponent forms without a dot (1e-3) as strings.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    else:
        raise TypeError(f"unsupported config type {tp} at {key}")
    raise ConfigError(f"'{key}' must be of type {tp.__name__}, got {value!r}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` overrides (values parsed as YAML) to a nested dict in place."""
    for item in overrides:
        path, sep, raw = item.lstrip("-").partition("=")
        if not sep or not path:
            raise ConfigError(f"override '{item}' must look like --section.key=value")
        node = data
        parts = path.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({e.__class__.__name__}); quote it or fix it") from e
    return data


def load_yaml(path: Path, *, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a YAML mapping from ``path`` with errors that name the file.

    A top-level ``include: [a.yaml, ...]`` (paths relative to this file) merges those files first,
    in order; this file's own keys then override theirs, section by section.
    """
    data = _read_yaml(path)
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"config file '{path}': 'include' must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for name in includes:
        target = (path.parent / name).resolve()
        if target in _seen:
            raise ConfigError(f"config file '{path}': 'include' of '{name}' forms a cycle")
        merged = merge(merged, load_yaml(target, _seen=(*_seen, path.resolve())))
    return merge(merged, data)


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_file(path: Path, *, kind: str = "config file", fix: str = "pass an existing YAML job file") -> Any:
    """The YAML in ``path``; a missing file or bad syntax is a ConfigError naming the ``kind`` of
    file, the path and the fix (``fix``: what to do when the file is missing)."""
    if not path.is_file():
        raise ConfigError(f"{kind} '{path}' does not exist; {fix}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{kind} '{path}' is not valid YAML: {yaml_problem(e)}; fix the syntax there") from e


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parse error on one line: what is wrong and where (line and column, from 1)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def to_dict(obj: Any) -> Any:
    """Turns a config dataclass tree back into plain YAML-friendly data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


__all__ = ["build", "convert", "apply_overrides", "load_yaml", "merge", "to_dict"]
