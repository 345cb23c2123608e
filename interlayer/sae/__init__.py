"""Sparse autoencoders: one module per architecture (registered in one line in
:data:`~interlayer.sae.architectures.ARCHITECTURES`), the fused kernels, the trainer, the metrics and the
folder format.

>>> from interlayer.sae import load_sae
>>> sae = load_sae("runs/minilm/layers.3")
>>> x_hat = sae(x)            # x [..., d], any leading shape
>>> z = sae.encode(x, k=8)    # codes at another budget, for architectures with a k
"""

from interlayer.sae.architectures import ARCHITECTURES, build_sae, make_config
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from interlayer.sae.boosted import BoostedConfig, BoostedSAE, boost_config, stack_boosted
from interlayer.sae.config import SAEConfig
from interlayer.sae.hierarchical import HierarchicalConfig, HierarchicalTopKSAE
from interlayer.sae.io import load_sae, load_saes, save_sae
from interlayer.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from interlayer.sae.kron import KronConfig, KronSAE
from interlayer.sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from interlayer.sae.relu import ReLUConfig, ReLUSAE
from interlayer.sae.topk import TopKConfig, TopKSAE
from interlayer.sae.trainer import TrainConfig

__all__ = [
    "ARCHITECTURES",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "BoostedConfig",
    "BoostedSAE",
    "HierarchicalConfig",
    "HierarchicalTopKSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "KronConfig",
    "KronSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ReLUConfig",
    "ReLUSAE",
    "SAEConfig",
    "SparseAutoencoder",
    "TopKConfig",
    "TopKSAE",
    "TrainConfig",
    "boost_config",
    "build_sae",
    "load_sae",
    "load_saes",
    "make_config",
    "save_sae",
    "stack_boosted",
]
