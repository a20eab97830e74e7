"""Does fbgemm round fp16 table updates stochastically on this machine? (docs/precision.md)

One fp16 row at 1.0, 200 plain SGD steps of lr 1e-4 with gradient 1 on every weight: 1e-4 is
below half an fp16 step at 1.0 (2^-12 = 2.4e-4), so rounding to nearest loses every update and
the row stays at 1.0, while stochastic rounding lands near 1 - 200 * 1e-4 = 0.98 on average.
Runs fbgemm's training TBE directly, with ``stochastic_rounding`` on and off, on CPU (and on CUDA
where there is one). Usage:

    python bench/fp16_rounding.py
"""

from __future__ import annotations

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

STEPS, LR, DIM = 200, 1e-4, 64


def final_mean(device: str, stochastic: bool) -> float:
    location, compute = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if device == "cuda" else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    tbe = SplitTableBatchedEmbeddingBagsCodegen([(10, DIM, location, compute)], optimizer=EmbOptimType.EXACT_SGD, learning_rate=LR,
                                                weights_precision=SparseType.FP16, stochastic_rounding=stochastic,
                                                pooling_mode=PoolingMode.SUM, device=torch.device(device))
    with torch.no_grad():
        tbe.split_embedding_weights()[0].fill_(1.0)
    ids, offsets = torch.zeros(1, dtype=torch.long, device=device), torch.tensor([0, 1], dtype=torch.long, device=device)
    for _ in range(STEPS):
        tbe(ids, offsets).sum().backward()
    return tbe.split_embedding_weights()[0][0].float().mean().item()


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"row mean after {STEPS} SGD steps of {LR} from 1.0 (nearest rounding keeps 1.0; stochastic ~{1 - STEPS * LR:.2f})")
    for device in devices:
        for stochastic in (True, False):
            print(f"{device}: stochastic_rounding={stochastic}: {final_mean(device, stochastic):.4f}")


if __name__ == "__main__":
    main()
