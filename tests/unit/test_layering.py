"""The package layering of README's layout section, read from the source with ``ast``.

Every ``import shardrec...`` counts, those inside functions too: a lazy import still ties the
packages together. A module is placed in its top-level package (``shardrec.train.trainer`` ->
``train``), except the section configs (``<package>/config.py``), which form a layer of their own
below everything that reads a job: ``job.py`` assembles them, and each package's own code may read
them without depending on the job.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "shardrec"

LAYERS: list[set[str]] = [
    {"cli"},
    {"tune"},
    {"launch"},
    {"train"},
    {"serving"},
    {"checkpoint"},
    {"sharding"},
    {"job"},
    {"models"},
    {"data"},
    {"train.config", "checkpoint.config", "serving.config", "sharding.config", "data.config"},
    {"config", "output"},
    {"errors", "__init__"},
]
"""Top to bottom: a unit may import only from its own unit or from the layers below it."""

JOB_MAY_IMPORT = {"config", "errors", "data.config", "data.schema", "sharding.config", "train.config",
                  "checkpoint.config", "models", "models.registry"}
"""job.py reads only section configs (the features section is data/schema.py) and the model registry
(``from shardrec.models import registry`` reads ``models/__init__.py``, which is empty)."""


def module_name(path: Path, root: Path) -> str:
    """``root/train/trainer.py`` -> ``train.trainer``; ``root/train/__init__.py`` -> ``train``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The layering unit of a module under shardrec (``train.trainer`` -> ``train``)."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] == "config":
        return f"{parts[0]}.config"
    return parts[0]


def shardrec_imports(path: Path, module: str, root: Path) -> set[str]:
    """Modules under shardrec that ``path`` imports, without the ``shardrec.`` prefix.

    ``from shardrec.train import trainer`` imports the package and its module ``trainer``;
    ``from shardrec import __version__`` imports the top package, named ``__init__``.
    """
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.removeprefix("shardrec.") for a in node.names if a.name.startswith("shardrec."))
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            if node.module == "shardrec" or node.module.startswith("shardrec."):
                package = node.module.removeprefix("shardrec").removeprefix(".")
                out.add(package or "__init__")
                for a in node.names:
                    sub = f"{package}.{a.name}".lstrip(".")
                    if _is_module(root, sub):
                        out.add(sub)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; shardrec imports by absolute names")
    return out


def _is_module(root: Path, dotted: str) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the shardrec modules it imports, for every module under ``root``."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        graph[module] = shardrec_imports(path, module, root)
    return graph


def unit_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between units (each listed once, from its smallest unit), found by depth-first search."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        for t in targets:
            if unit_of(t) != unit_of(module):
                edges.setdefault(unit_of(module), set()).add(unit_of(t))
    cycles: list[list[str]] = []

    def walk(start: str, node: str, trail: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                cycles.append([*trail, start])
            elif nxt > start and nxt not in trail:
                walk(start, nxt, [*trail, nxt])

    for start in sorted(edges):
        walk(start, start, [start])
    return cycles


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``module -> target`` for each import that goes up or sideways between LAYERS."""
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    out = []
    for module, targets in sorted(graph.items()):
        for t in sorted(targets):
            a, b = unit_of(module), unit_of(t)
            if a == b:
                continue
            if a not in rank or b not in rank:
                out.append(f"{module} -> {t}: unit '{a if a not in rank else b}' is in no layer of LAYERS")
            elif rank[b] <= rank[a]:
                out.append(f"{module} ({a}) imports {t} ({b}), which is not below it")
    return out


def registered_models(root: Path) -> set[str]:
    """Modules of ``models/`` that register a model (call ``register``): the zoo's models."""
    out = set()
    for path in (root / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        if any(isinstance(c.func, ast.Name) and c.func.id == "register" for c in calls) and path.stem != "registry":
            out.add(module_name(path, root))
    return out


def model_imports_model(graph: dict[str, set[str]], models: set[str]) -> list[str]:
    """``a imports b`` for each registered model module importing another one."""
    return [f"{m} imports {t}" for m in sorted(models) for t in sorted(graph.get(m, ())) if t in models and t != m]


def test_no_import_loop_between_packages() -> None:
    graph = import_graph(ROOT)
    assert unit_cycles(graph) == []


def test_imports_go_down_the_layers() -> None:
    assert layer_violations(import_graph(ROOT)) == []


def test_job_imports_only_section_configs() -> None:
    graph = import_graph(ROOT)
    assert graph["job"] <= JOB_MAY_IMPORT, sorted(graph["job"] - JOB_MAY_IMPORT)


def test_config_modules_import_no_code_above_them() -> None:
    graph = import_graph(ROOT)
    configs = [m for m in graph if unit_of(m).endswith(".config")]
    assert configs
    for m in configs:
        assert {unit_of(t) for t in graph[m]} <= {"config", "errors", unit_of(m)}, m


def test_no_model_imports_another_model() -> None:
    graph = import_graph(ROOT)
    models = registered_models(ROOT)
    assert {"models.dlrm", "models.bst", "models.sasrec"} <= models
    assert model_imports_model(graph, models) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_loop_is_found(tmp_path: Path) -> None:
    _write(tmp_path, {
        "train/__init__.py": "", "train/trainer.py": "from shardrec.job import JobConfig\n",
        "job.py": "def f():\n    from shardrec.train.trainer import Trainer\n",
    })
    graph = import_graph(tmp_path)
    assert graph["job"] == {"train.trainer"}
    assert unit_cycles(graph) == [["job", "train", "job"]]
    assert layer_violations(graph) == ["job (job) imports train.trainer (train), which is not below it"]


def test_a_section_config_is_its_own_unit(tmp_path: Path) -> None:
    _write(tmp_path, {
        "train/__init__.py": "", "train/config.py": "X = 1\n",
        "train/trainer.py": "from shardrec.job import JobConfig\n", "job.py": "from shardrec.train.config import X\n",
    })
    graph = import_graph(tmp_path)
    assert unit_cycles(graph) == [] and layer_violations(graph) == []


def test_a_model_importing_a_model_is_found(tmp_path: Path) -> None:
    _write(tmp_path, {
        "models/__init__.py": "",
        "models/bst.py": "@register('bst')\nclass BST: ...\n",
        "models/sasrec.py": "from shardrec.models.bst import PositionEmbedding\nregister('sasrec')\n",
        "models/retrieval.py": "class RetrievalModel: ...\n",
    })
    graph = import_graph(tmp_path)
    models = registered_models(tmp_path)
    assert models == {"models.bst", "models.sasrec"}
    assert model_imports_model(graph, models) == ["models.sasrec imports models.bst"]


@pytest.mark.parametrize("text, expected", [
    ("from shardrec.train import trainer, Trainer\n", {"train", "train.trainer"}),
    ("def f():\n    import shardrec.train.config\n", {"train.config"}),
    ("from shardrec import __version__\n", {"__init__"}),
    ("from shardrec import train\n", {"__init__", "train"}),
])
def test_imports_are_read_in_each_form(tmp_path: Path, text: str, expected: set[str]) -> None:
    _write(tmp_path, {"train/__init__.py": "", "train/trainer.py": "", "train/config.py": "", "cli.py": text})
    assert shardrec_imports(tmp_path / "cli.py", "cli", tmp_path) == expected
