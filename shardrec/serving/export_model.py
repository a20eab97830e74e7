"""``shardrec export``: a checkpoint as a self-contained TorchScript artifact for serving.

The checkpoint (any world size, any plan) is read straight from its DCP files into one unsharded
CPU model (shardrec/checkpoint/dcp_reader.py), its embedding collections are quantized with TorchRec's inference
quantization (``torchrec.inference.modules.quantize_embeddings``: FBGEMM inference TBEs, one dtype
per table allowed), and the model, wrapped so that its forward takes plain tensors, is traced with
``torchrec.fx`` and scripted. The folder holds::

    model.pt        forward(dense float32 [B, D], values int64 [N], lengths int32 [F * B]) -> scores
    manifest.json   kind, model, step, feature schema (hashing, boundaries, max_len), inputs, outputs, tables

A retrieval (two-tower) model is written as its two towers instead of ``model.pt``::

    user_tower.pt            forward(dense [B, D], values, lengths of the user features) -> user vectors [B, V]
    item_tower.pt            forward(values, lengths of the item features) -> item vectors [B, V]
    item_embeddings.parquet  (id, vector) of every item of the job's data.items_path, for an ANN index

The item features are those the catalogue has columns for (as in training's full-ranking
evaluation); the user features are the others. Each tower fills the other side's features with
empty rows, so a request carries only its own side.

``values``/``lengths`` are a KeyedJaggedTensor's, key-major in ``manifest["inputs"]["sparse"]``
order, as :class:`shardrec.data.reader.ParquetReader` yields them; scores are sigmoid
probabilities, ``[B]`` or ``[B, T]`` for multi-task models. ``torch.jit.load`` reads ``model.pt``
in a process that imports only torch and fbgemm_gpu.
"""

# No ``from __future__ import annotations``: fx copies ServingModule.forward's annotations into the
# traced code, and TorchScript cannot read them as strings.

import json
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torchrec
from torch import nn
from torchrec.inference.modules import quantize_embeddings
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec import __version__
from shardrec.config import to_dict
from shardrec.data.feature_stats import STATS_FILE, FeatureStats, apply_stats, read_stats
from shardrec.data.schema import FeatureSchema, LabelConfig
from shardrec.errors import CheckpointError, ConfigError
from shardrec.job import JobConfig, load_job
from shardrec.models import registry
from shardrec.models.tasks import serve_outputs
from shardrec.output import atomic_folder
from shardrec.checkpoint.store import first_problems, read_meta, resolve_resume, table_of_key
from shardrec.data.catalogue import Catalogue, catalogue_kjt, read_catalogue, write_item_embeddings
from shardrec.checkpoint.dcp_reader import SavedCheckpoint
from shardrec.serving.config import ExportConfig, Quantize

DTYPES: dict[str, torch.dtype] = {"int8": torch.qint8, "int4": torch.quint4x2, "fp16": torch.float16, "none": torch.float32}
"""Weight dtype of each ``--quantize`` choice; ``none`` keeps float32 weights in the inference kernels."""
SAVED_PREFIX = "model.model."
"""Where the zoo model's tensors are in a checkpoint: the trainer saves ``{"model": TrainModule(model)}``."""
MODEL_FILE = "model.pt"
TOWER_FILES = {"user_tower": "user_tower.pt", "item_tower": "item_tower.pt", "item_embeddings": "item_embeddings.parquet"}
"""The files of a two-tower artifact."""
ITEM_BATCH = 4096
"""Catalogue rows per item-tower call when writing the item embeddings."""
MANIFEST = "manifest.json"
FORMAT = 1
"""Version of the artifact layout (file names, forward signature, manifest keys)."""


def export_model(cfg: ExportConfig) -> dict[str, Any]:
    """Writes the artifact of ``cfg.checkpoint`` to ``cfg.out`` and returns its manifest.

    Raises:
        CheckpointError: the checkpoint is incomplete or its tensors do not match the job's model.
        ConfigError: a bad quantization or table name, or a model TorchScript cannot hold.
    """
    path = resolve_resume(Path(cfg.checkpoint))
    meta = read_meta(path)
    if cfg.out.exists():
        raise CheckpointError(f"export folder '{cfg.out}' already exists; pass another --out or remove it")
    job = load_job(cfg.config or path / "config.yaml", [])
    model = build_unsharded(job, path)
    dtypes = table_dtypes(model, cfg)
    stats = checkpoint_stats(job.features, path)
    features = apply_stats(job.features, stats, where=f"checkpoint '{path}'")
    manifest = build_manifest(job, model, step=meta["step"], checkpoint=path, dtypes=dtypes, features=features)
    if stats is not None:
        manifest["feature_stats"] = stats.to_json()
    if registry.get(job.model_name).retrieval:
        ids, catalogue = read_catalogue(_items_path(job), features, item_feature=model.item_feature)
        towers = TwoTowers(quantize(model, dtypes), schema=features, items=catalogue)
        scripted = {name: to_torchscript(tower, model=job.model_name) for name, tower in towers.modules().items()}
        manifest.update(two_tower_manifest(job, towers))
    else:
        serving = ServingModule(quantize(model, dtypes), keys=job.features.unweighted_names, tasks=job.features.tasks)
        scripted = {"model": to_torchscript(serving, model=job.model_name)}
    with atomic_folder(cfg.out) as tmp:
        for name, module in scripted.items():
            module.save(str(tmp / manifest["files"][name]))
        if "item_tower" in scripted:
            vectors = item_vectors(scripted["item_tower"], features, catalogue, inputs=towers.item_inputs)
            write_item_embeddings(tmp / TOWER_FILES["item_embeddings"], Catalogue(ids=ids, vectors=vectors))
            manifest["items"] = {"path": str(_items_path(job)), "count": len(ids), "computed_by": TOWER_FILES["item_tower"]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def checkpoint_stats(schema: FeatureSchema, path: Path) -> FeatureStats | None:
    """The feature statistics checkpoint ``path`` carries, when ``schema`` needs them."""
    if not schema.needs_stats:
        return None
    if not (path / STATS_FILE).is_file():
        raise CheckpointError(f"checkpoint '{path}' has no {STATS_FILE}, which its job's normalized or bucketized features "
                              f"need; copy the training run's {STATS_FILE} into it")
    return read_stats(path / STATS_FILE)


def _items_path(job: JobConfig) -> str:
    if job.data.items_path is None:
        raise ConfigError(f"model '{job.model_name}' is a two-tower model, exported with the vectors of every item of its catalogue: "
                          "set data.items_path in the job file (--config) to the item catalogue (Parquet, one row per item)")
    return job.data.items_path


def build_unsharded(job: JobConfig, path: Path) -> nn.Module:
    """The job's model on CPU in eval mode, every tensor read whole from checkpoint ``path``."""
    saved = SavedCheckpoint(path)
    saved.check_files()
    model = registry.build_model(job.model_name, job.model_params, schema=job.features, device=torch.device("cpu"))
    state = model.state_dict()
    check_tensors(path, state, saved)
    model.load_state_dict({k: saved.read(SAVED_PREFIX + k) for k in state})
    return model.eval()


def check_tensors(path: Path, state: dict[str, torch.Tensor], saved: SavedCheckpoint) -> None:
    """Raises a CheckpointError naming each table or tensor that is missing or of another shape."""
    ours = {SAVED_PREFIX + k: tuple(v.shape) for k, v in state.items()}
    theirs = {k: tuple(v.size) for k, v in saved.tensors.items() if k.startswith(SAVED_PREFIX)}
    problems = []
    for key in sorted(ours.keys() | theirs.keys()):
        name = _describe(key)
        if key not in theirs:
            problems.append(f"{name} is in the config, not in the checkpoint")
        elif key not in ours:
            problems.append(f"{name} is in the checkpoint, not in the config")
        elif ours[key] != theirs[key]:
            problems.append(f"{name} is {_shape(theirs[key])} in the checkpoint, {_shape(ours[key])} in the config")
    if problems:
        raise CheckpointError(f"checkpoint '{path}' does not match the job's model: {first_problems(problems)}; export with the config the "
                              "checkpoint was trained with (its config.yaml, the default of --config)")


def _describe(key: str) -> str:
    table = table_of_key(key)
    return f"table '{table}'" if table is not None else f"tensor '{key.removeprefix(SAVED_PREFIX)}'"


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


def embedding_tables(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every embedding table of ``model``: name -> rows, dim and the features that read it."""
    tables: dict[str, dict[str, Any]] = {}
    for module in model.modules():
        configs = getattr(module, "embedding_bag_configs", None) or getattr(module, "embedding_configs", None)
        if callable(configs):
            for t in configs():
                tables[t.name] = {"rows": t.num_embeddings, "dim": t.embedding_dim, "features": list(t.feature_names),
                                  "precision": "fp16" if t.data_type == DataType.FP16 else "fp32"}
    return tables


def table_dtypes(model: nn.Module, cfg: ExportConfig) -> dict[str, Quantize]:
    """Each table's quantization: ``table_quantize``, else ``quantize``, else the precision it was
    trained in (fp16 stays fp16); raises a ConfigError naming an unknown table in ``table_quantize``."""
    tables = embedding_tables(model)
    unknown = sorted(set(cfg.table_quantize) - set(tables))
    if unknown:
        raise ConfigError(f"--table-quantize names {', '.join(unknown)}, not tables of this model; its tables: {', '.join(sorted(tables))}")
    trained: dict[str, Quantize] = {t: "fp16" if info["precision"] == "fp16" else "none" for t, info in tables.items()}
    return {t: cfg.table_quantize.get(t, cfg.quantize or trained[t]) for t in tables}


def quantize(model: nn.Module, dtypes: dict[str, Quantize]) -> nn.Module:
    """``model`` with every embedding collection swapped for TorchRec's quantized inference one."""
    per_table = {t: DTYPES[q] for t, q in dtypes.items()}
    return quantize_embeddings(
        model, dtype=torch.qint8, inplace=True, per_table_weight_dtype=per_table,
        additional_qconfig_spec_keys=[EmbeddingCollection], additional_mapping={EmbeddingCollection: QuantEmbeddingCollection},
    )


class ServingModule(nn.Module):
    """A zoo model whose forward takes plain tensors and returns probabilities.

    Example::

        serving = ServingModule(model, keys=["C1", "C2"])
        # 2 rows: C1 = [[4, 7], [1]], C2 = [[], [9]]
        scores = serving(torch.randn(2, 3), torch.tensor([4, 7, 1, 9]), torch.tensor([2, 1, 0, 1], dtype=torch.int32))
    """

    def __init__(self, model: nn.Module, *, keys: list[str], tasks: list[LabelConfig] | None = None) -> None:
        super().__init__()
        self.model = model
        self.keys = keys
        self.tasks = tasks or [LabelConfig(name="label")]

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` (``[B, W]``) for dense ``[B, D]`` and the key-major ``values``/``lengths``:
        per task a probability (binary), a value (regression) or class probabilities (multiclass)."""
        kjt = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths)
        return serve_outputs(self.model(dense, kjt), self.tasks)


class _Tower(nn.Module):
    """One side of a retrieval model: its forward takes the values/lengths of its own features,
    key-major in ``inputs`` order, and gives the model's KJT of every feature (``keys``), the
    other side's features empty."""

    def __init__(self, model: nn.Module, *, keys: list[str], inputs: list[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys
        self.inputs = inputs
        self.slots = [inputs.index(k) if k in inputs else -1 for k in keys]

    def kjt(self, values: torch.Tensor, lengths: torch.Tensor) -> KeyedJaggedTensor:
        own = lengths.view(len(self.inputs), -1)
        empty = torch.zeros_like(own[0])
        return KeyedJaggedTensor(keys=self.keys, values=values, lengths=torch.cat([own[i] if i >= 0 else empty for i in self.slots]))


class UserTower(_Tower):
    """A retrieval model's user vectors from dense features and the user-side sparse features."""

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """User vectors ``[B, V]`` for dense ``[B, D]`` and the user features' key-major ``values``/``lengths``."""
        return self.model.user_vectors(dense, self.kjt(values, lengths))


class ItemTower(_Tower):
    """A retrieval model's item vectors from the item-side sparse features."""

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Item vectors ``[B, V]`` for the item features' key-major ``values``/``lengths``."""
        return self.model.item_vectors(self.kjt(values, lengths))


class TwoTowers:
    """The user and item towers of retrieval ``model``, split by the columns of catalogue ``items``.

    Raises:
        ConfigError: no feature is left for the user side.
    """

    def __init__(self, model: nn.Module, *, schema: FeatureSchema, items: pa.Table) -> None:
        names = set(items.column_names)
        plain = [f for f in schema.sparse if not f.weights]
        self.item_inputs = [f.name for f in plain if f.negatives is None and f.columns and all(c in names for c in f.columns)]
        self.user_inputs = [f.name for f in plain if f.name not in self.item_inputs and f.negatives is None]
        if not self.user_inputs:
            raise ConfigError(f"the item catalogue has a column for every sparse feature ({', '.join(self.item_inputs)}), so the "
                              "user tower would read none; keep only the item-side columns in data.items_path")
        self.user = UserTower(model, keys=schema.unweighted_names, inputs=self.user_inputs)
        self.item = ItemTower(model, keys=schema.unweighted_names, inputs=self.item_inputs)

    def modules(self) -> dict[str, nn.Module]:
        """Manifest file key -> tower."""
        return {"user_tower": self.user, "item_tower": self.item}


def tower_inputs(kjt: KeyedJaggedTensor, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, lengths)`` of features ``names`` of ``kjt``, key-major: a tower's input."""
    jts = [kjt[n] for n in names]
    return torch.cat([jt.values() for jt in jts]), torch.cat([jt.lengths() for jt in jts])


def tower_schema(schema: FeatureSchema, names: list[str]) -> FeatureSchema:
    """``schema`` narrowed to the sparse features ``names`` (and their tables): what a tower's input is read with."""
    sparse = [f for f in schema.sparse if f.name in names]
    used = {f.table for f in sparse}
    return FeatureSchema(label=schema.label, dense=schema.dense, sparse=sparse, tables=[t for t in schema.tables if t.name in used])


@torch.inference_mode()
def item_vectors(tower: torch.jit.ScriptModule, schema: FeatureSchema, items: pa.Table, *, inputs: list[str]) -> torch.Tensor:
    """``[N, V]`` vectors of every catalogue row, through the exported item tower itself."""
    parts = []
    for start in range(0, items.num_rows, ITEM_BATCH):
        kjt = catalogue_kjt(items.slice(start, ITEM_BATCH), schema, where="data.items_path")
        parts.append(tower(*tower_inputs(kjt, inputs)))
    return torch.cat(parts)


def two_tower_manifest(job: JobConfig, towers: TwoTowers) -> dict[str, Any]:
    """The manifest keys that differ for a two-tower artifact."""
    key_major = "values int64 [N], lengths int32 [len(sparse) * B], key-major"
    return {
        "kind": "two_tower",
        "files": dict(TOWER_FILES),
        "inputs": {
            "user": {"dense": job.features.dense_names, "sparse": towers.user_inputs, "signature": f"forward(dense float32 [B, len(dense)], {key_major})"},
            "item": {"sparse": towers.item_inputs, "signature": f"forward({key_major})"},
        },
        "outputs": {"vector": "user_tower: [B, V] user vectors; item_tower: [B, V] item vectors; a (user, item) pair scores by their dot product"},
    }


TRACED_LEAVES = ["PretrainedTransformer"]
"""Blocks TorchScript cannot script (``transformers`` models): kept whole by the fx trace and
recorded by ``torch.jit.trace`` on their :meth:`example_inputs` instead."""


def to_torchscript(module: nn.Module, *, model: str) -> torch.jit.ScriptModule:
    """Traces ``module`` with torchrec.fx and scripts it; a ConfigError says why TorchScript cannot hold it."""
    try:
        graph = torchrec.fx.symbolic_trace(module, leaf_modules=TRACED_LEAVES)
        for name, sub in list(graph.named_modules()):
            if type(sub).__name__ in TRACED_LEAVES:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python
                    graph.set_submodule(name, torch.jit.trace(sub.eval(), sub.example_inputs(), check_trace=False))
        return torch.jit.script(graph)
    except Exception as e:  # fx and TorchScript report unsupported Python as assorted exceptions
        first = "\n".join(str(e).strip().splitlines()[:6])
        raise ConfigError(f"model '{model}' cannot be exported: TorchScript cannot hold it ({type(e).__name__}: {first})") from e


def output_columns(schema: FeatureSchema, *, multi_task: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """Names of the served model's output columns, in order, and each task's place among them:
    ``score`` (``score_<label>`` with several tasks) per binary or regression task, one
    ``score_<class>`` (``score_<label>_<class>``) per class of a multiclass task."""
    columns: list[str] = []
    tasks: list[dict[str, Any]] = []
    for t in schema.tasks:
        prefix = f"score_{t.name}" if multi_task else "score"
        classes = (t.classes or [str(i) for i in range(t.width)]) if t.type == "multiclass" else None
        names = [f"{prefix}_{c}" for c in classes] if classes is not None else [prefix]
        kind = {"binary": "probability", "regression": "value", "multiclass": "class probabilities"}[t.type]
        tasks.append({"label": t.name, "type": t.type, "columns": names, "kind": kind,
                      **({"classes": classes, "argmax_column": f"class_{t.name}" if multi_task else "class"} if classes else {})})
        columns += names
    return columns, tasks


def build_manifest(
    job: JobConfig, model: nn.Module, *, step: int, checkpoint: Path, dtypes: dict[str, Quantize], features: FeatureSchema | None = None
) -> dict[str, Any]:
    """What a server or ``shardrec predict`` needs besides the module: inputs, outputs, preprocessing."""
    schema: FeatureSchema = job.features
    entry = registry.get(job.model_name)
    tables = embedding_tables(model)
    columns, tasks = output_columns(features or schema, multi_task=entry.multi_task)
    return {
        "format": FORMAT,
        "kind": "ranking",
        "shardrec_version": __version__,
        "model": job.model_name,
        "step": step,
        "checkpoint": str(checkpoint),
        "files": {"model": MODEL_FILE},
        "inputs": {"dense": schema.dense_names, "sparse": schema.unweighted_names,
                   "signature": "forward(dense float32 [B, len(dense)], values int64 [N], lengths int32 [len(sparse) * B], key-major)"},
        "outputs": {"scores": columns, "shape": "[B]" if len(columns) == 1 else f"[B, {len(columns)}]", "tasks": tasks,
                    "kind": "per task: probability (sigmoid of the logit), value, or class probabilities (softmax)"},
        "tables": {t: {**info, "dtype": dtypes[t]} for t, info in tables.items()},
        "features": to_dict(schema),
    }
