"""Standard ReLU SAE with an L1 penalty (Bricken et al. 2023; Anthropic's April 2024 update),
``--architecture relu`` (SAELens calls it ``standard``; dictionary_learning ``AutoEncoder``):

    z = ReLU(W_enc (x − b_dec) + b_enc),   x̂ = W_decᵀ z + b_dec.

Training loss terms: Σ_b ‖x_b − x̂_b‖² and the penalty λ · Σ_b Σ_f z_bf ‖W_dec[f]‖; decoder rows are kept at
unit norm here, so the penalty is λ · Σ z. The trainer divides the first by Σ‖x − x̄‖² and the second by the
batch size, so λ prices one unit of mean per-token L1 in units of FVU. No AuxK (the penalty decides which
latents fire). Mostly here so that SAEs trained elsewhere with this architecture load, evaluate and splice
like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interlayer.errors import UserError
from interlayer.sae.base import DenseEncoderSAE, TrainingOutput
from interlayer.sae.config import SAEConfig


@dataclass(frozen=True, kw_only=True)
class ReLUConfig(SAEConfig):
    """A standard ReLU SAE trained with an L1 penalty."""

    architecture: str = "relu"
    l1_coefficient: float = 1e-3
    """λ, the price of one unit of per-token L1 (Σ_f z_f with unit decoder rows) in units of FVU."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.l1_coefficient >= 0:
            raise UserError(f"l1_coefficient must be at least 0, got {self.l1_coefficient}")


class ReLUSAE(DenseEncoderSAE):
    """z = ReLU(W_enc (x − b_dec) + b_enc), trained with an L1 penalty."""

    config_class = ReLUConfig
    cfg: ReLUConfig

    def _codes(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        return self.pre_activations(x_BD).relu()

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        z_BF = self.pre_activations(x_BD).relu()
        return self.dense_training_output(x_BD, z_BF, penalty=self.cfg.l1_coefficient * z_BF.sum())
