"""TopK sparse autoencoder (Gao et al. 2024), ``--architecture topk``:

    z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc)),   x̂ = W_decᵀ z + b_dec,

with W_enc, W_dec of shape F×d (one row per latent). Training loss term: Σ_b ‖x_b − x̂_b‖², plus AuxK: the
top k_aux pre-activations among dead latents, decoded without bias and regressed onto the residual.
At inference any k ≤ F can be asked for (``sae.encode(x, k=8)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interlayer.sae.base import DenseEncoderSAE, TrainingOutput, topk_codes
from interlayer.sae.config import KConfig
from interlayer.sae.kernels import fused_topk_encode, sparse_decode


@dataclass(frozen=True, kw_only=True)
class TopKConfig(KConfig):
    """A TopK SAE: exactly k active latents per token."""

    architecture: str = "topk"


class TopKSAE(DenseEncoderSAE):
    """z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc)), x̂ = W_decᵀ z + b_dec (fused encoder, sparse decoder)."""

    config_class = TopKConfig
    cfg: TopKConfig

    def encode_sparse(self, x_BD: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k (value, index) pairs per token of a [B, d] batch (``k`` defaults to the trained k)."""
        k = self.cfg.k if k is None else k
        values_BK, indices_BK, _, _ = fused_topk_encode(x_BD - self.b_dec_D, self.W_enc_FD, self.b_enc_F, k)
        return values_BK, indices_BK

    def _codes(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        return topk_codes(self.pre_activations(x_BD), self.cfg.k if k is None else k)

    def _forward(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        values_BK, indices_BK = self.encode_sparse(x_BD, k)
        return sparse_decode(values_BK, indices_BK, self.W_dec_FD) + self.b_dec_D

    def select(
        self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training selection: (values_BK, latents_BK, AuxK values_BA, AuxK latents_BA)."""
        return fused_topk_encode(x_BD - self.b_dec_D, self.W_enc_FD, self.b_enc_F, self.cfg.k, dead_F, k_aux)

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        return self.sparse_training_output(x_BD, self.select(x_BD, dead_F, k_aux))
