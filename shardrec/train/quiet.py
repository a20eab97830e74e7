"""Silences library chatter that says nothing to a shardrec user (kept: real warnings and errors).

Warnings are dropped by category and message, each one known: what a 2-rank run of every model of
the zoo printed (tests/distributed/test_zoo_sharded.py without these filters). Anything else a
library warns about still shows (in the rank's log, and on the terminal for rank 0).
"""

from __future__ import annotations

import logging
import warnings

KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torchrec 1.8 passes the old DDP argument itself; nothing a job can change.
    (FutureWarning, r"`broadcast_buffers` is deprecated"),
    # torchrec's collectives call the torch.distributed names torch 2.13 renamed.
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # torchrec's default storage reservation, which the planner uses on purpose (docs/planning.md).
    (FutureWarning, r"HeuristicalStorageReservation is known to cause issues"),
    # torchrec's state dicts hold ShardedTensors, which torch deprecates in favour of DTensor.
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (UserWarning, r".*is_fx_tracing"),
    (UserWarning, r".*TypedStorage is deprecated"),
    # Data-parallel tables use fbgemm's dense kernel, whose autograd is a Python Function; its
    # training matches the fused kernels (tests/distributed/test_sharding_types.py).
    (UserWarning, r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered"),
)


def quiet_libraries() -> None:
    """Lowers torchrec's planner/sharding loggers to errors and drops the known warnings."""
    for name in ("torchrec", "root", "torch.distributed.elastic", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
