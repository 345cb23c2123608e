"""Sparse autoencoders: configs, architectures (one line each in ``ARCHITECTURE_CLASSES``), the fused
kernels, the trainer, the metrics and the folder format.

>>> from interlayer.sae import load_sae
>>> sae = load_sae("runs/minilm/layers.3")
>>> x_hat = sae(x_ND)
"""

from interlayer.sae.config import SAEConfig
from interlayer.sae.io import load_sae, save_sae
from interlayer.sae.topk import ARCHITECTURE_CLASSES, BatchTopKSAE, SparseAutoencoder, TopKSAE, build_sae
from interlayer.sae.trainer import TrainConfig

__all__ = [
    "ARCHITECTURE_CLASSES",
    "BatchTopKSAE",
    "SAEConfig",
    "SparseAutoencoder",
    "TopKSAE",
    "TrainConfig",
    "build_sae",
    "load_sae",
    "save_sae",
]
