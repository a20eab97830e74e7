"""The batch type every reader yields and every model's training wrapper consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """Dense features, sparse id features and labels of ``B`` rows.

    Attributes:
        dense_features: float tensor ``[B, num_dense]``.
        sparse_features: KeyedJaggedTensor of every feature without weights (ids, multi-hot,
            sequences, bucketized, combo), keyed by feature name, ``stride() == B``.
        labels: float tensor of 0/1, ``[B]`` for one label or ``[B, T]`` for T tasks.
        weighted_features: KeyedJaggedTensor of the weighted features (``weights()`` set), or None.
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    weighted_features: KeyedJaggedTensor | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        weighted = self.weighted_features
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            weighted_features=None if weighted is None else weighted.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)
        if self.weighted_features is not None:
            self.weighted_features.record_stream(stream)

    def pin_memory(self) -> Batch:
        weighted = self.weighted_features
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            weighted_features=None if weighted is None else weighted.pin_memory(),
        )

    @property
    def size(self) -> int:
        """Number of rows."""
        return self.labels.shape[0]
