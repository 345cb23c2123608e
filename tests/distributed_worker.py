"""Run by tests/test_distributed.py under torchrun: train the SAEs of three sites on fixed random
activations, the ranks sharing the work by sites or by data, optionally killed (an exception on every rank)
when chunk 2 is due.

    python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_worker.py OUT MODE ARCHS [STOP_AT]

ARCHS names one architecture per site, comma-separated (``topk,topk,topk``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from interlayer.activations import Chunk
from interlayer.distributed import process_group
from interlayer.sae import TrainConfig, make_config
from interlayer.sae.config import SAEConfig
from interlayer.sae.trainer import train_saes

SITES = ("a", "b", "c")
DATA_ND = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
ACTS = {site: DATA_ND * (i + 1) + i for i, site in enumerate(SITES)}  # a different stream per site
for i, acts in enumerate(ACTS.values()):
    acts[i::37] *= 50  # outlier tokens, different ones per site, filtered by outlier_norm
ARCH_OPTIONS = {"jumprelu": {"l0_coefficient": 1e-3}}


def sae_cfgs(archs: Sequence[str]) -> dict[str, SAEConfig]:
    """Site a, b, c → an SAE of ``archs[0]``, ``archs[1]``, ``archs[2]`` (d 16, F 256, k 4 where it has one)."""
    return {
        site: make_config(arch, d_in=16, latents=256, **ARCH_OPTIONS.get(arch, {"k": 4}))
        for site, arch in zip(SITES, archs, strict=True)
    }


# Latents die after 256 tokens without firing, so AuxK and the shared dead-latent counters are in play;
# outliers make the ranks' shares of a batch differ in size.
TRAIN = TrainConfig(tokens=3072, batch_size=256, dead_tokens=256, checkpoint_seconds=0, outlier_norm=4.0)
ROWS = 512


def chunks(start: int, stop_at: int | None = None):
    """Chunks of ROWS rows of every site; raises KeyboardInterrupt when chunk ``stop_at`` is due."""
    for index in range(start, DATA_ND.shape[0] // ROWS):
        if index == stop_at:
            raise KeyboardInterrupt
        yield Chunk(index, {site: acts[index * ROWS : (index + 1) * ROWS] for site, acts in ACTS.items()})


def main(out: str, mode: str, archs: str, stop_at: int | None) -> None:
    group = process_group("cpu")
    cfgs = sae_cfgs(archs.split(","))
    train_saes(out, lambda start: chunks(start, stop_at), cfgs, TRAIN, {}, group=group, distribute=mode)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None)
