"""Sharders: torchrec's, with row-wise sharding also offered on CPU.

torchrec's EmbeddingBagCollectionSharder withholds row_wise and table_row_wise on CPU, a rule from
2022 when gloo lacked reduce_scatter. Gloo emulates it now, and both train correctly on gloo ranks,
so on CPU we offer every sharding type and can test each of them without a GPU.
"""

from __future__ import annotations

from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingType

ALL_SHARDING_TYPES: tuple[str, ...] = (
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.DATA_PARALLEL.value,
)
_ROW_WISE = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


class EmbeddingBagCollectionSharderAnyDevice(EmbeddingBagCollectionSharder):
    """EmbeddingBagCollectionSharder that also proposes row_wise and table_row_wise on CPU."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            types += [t for t in _ROW_WISE if t not in types]
        return types


def default_sharders() -> list[ModuleSharder[nn.Module]]:
    """The sharders shardrec plans and shards with."""
    # EmbeddingCollectionSharder (unpooled sequence tables) already offers row_wise on every device.
    return [EmbeddingBagCollectionSharderAnyDevice(), EmbeddingCollectionSharder()]
