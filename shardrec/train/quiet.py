"""Silences library chatter that says nothing to a shardrec user (kept: real warnings and errors)."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """Lowers torchrec's planner/sharding loggers to errors and drops known noisy warnings."""
    for name in ("torchrec", "root", "torch.distributed.elastic", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*is_fx_tracing.*",
        ".*DistributedDataParallel.*",
        ".*TypedStorage is deprecated.*",
        ".*torch.distributed._shard.*",
        ".*Sharding Type is data_parallel.*",
        # Data-parallel tables use fbgemm's dense kernel, whose autograd is a Python Function; its
        # training matches the fused kernels (tests/distributed/test_sharding_types.py).
        ".*dense_embedding_codegen_lookup_function: an autograd kernel was not registered.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchrec")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
