"""quiet_libraries drops the known library warnings by category and message, nothing else."""

from __future__ import annotations

import warnings

import pytest

from shardrec.train.quiet import KNOWN_WARNINGS, quiet_libraries

KNOWN = [
    (FutureWarning, "`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead."),
    (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single` instead."),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` instead."),
    (FutureWarning, "HeuristicalStorageReservation is known to cause issues, particularly during dry run"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor."),
    (UserWarning, "fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered to the Autograd key(s)"),
]


def _shown(category: type[Warning], message: str) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn(message, category, stacklevel=1)
    return [str(w.message) for w in seen]


@pytest.mark.parametrize("category, message", KNOWN)
def test_known_library_warnings_are_dropped(category: type[Warning], message: str) -> None:
    assert _shown(category, message) == []


@pytest.mark.parametrize("category, message", [
    (FutureWarning, "`some_new_api` is deprecated and will change what your model computes"),
    (DeprecationWarning, "an argument shardrec passes is going away"),
    (UserWarning, "torchrec: table t_C1 has fewer rows than ranks"),
    (FutureWarning, "`broadcast_buffers` will be removed"),  # a known subject, an unknown message
])
def test_other_warnings_still_show(category: type[Warning], message: str) -> None:
    assert _shown(category, message) == [message]


def test_each_filter_names_a_category_and_a_message() -> None:
    assert all(issubclass(c, Warning) and c is not Warning and m for c, m in KNOWN_WARNINGS)
