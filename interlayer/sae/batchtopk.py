"""BatchTopK sparse autoencoder (Bussmann et al. 2024), ``--architecture batchtopk``.

In training, keep the k·B largest entries of ReLU(pre), pre = W_enc (x − b_dec) + b_enc, over the whole
batch of B tokens (so k is a per-token mean), and track θ, a running mean (momentum 0.99, starting from the
first batch's value, so short runs are not biased towards 0) of the smallest kept value per batch. At
inference it is a JumpReLU with that threshold: z_f = ReLU(pre_f) · 1[pre_f > θ]; ``encode(x, k=…)``
keeps the top k per token instead (TopK inference, for evaluating it at other budgets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interlayer.sae.base import DenseEncoderSAE, TrainingOutput, topk_codes
from interlayer.sae.config import KConfig, SAEConfig


@dataclass(frozen=True, kw_only=True)
class BatchTopKConfig(KConfig):
    """A BatchTopK SAE: k active latents per token on average over each training batch."""

    architecture: str = "batchtopk"


class BatchTopKSAE(DenseEncoderSAE):
    """BatchTopK in training (k·B largest over the batch); JumpReLU with the learned θ at inference."""

    config_class = BatchTopKConfig
    batch_coupled = True
    file_names = {**DenseEncoderSAE.file_names, "threshold": "threshold"}
    threshold_momentum = 0.99

    cfg: BatchTopKConfig
    threshold: torch.Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((), -1.0))  # -1: not set yet

    def _codes(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        pre_BF = self.pre_activations(x_BD)
        if k is not None:
            return topk_codes(pre_BF, k)
        return pre_BF.relu() * (pre_BF > self.threshold)

    def batch_select(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_BF, ReLU(pre)_BF): the k·B largest entries of the batch kept, θ updated from them."""
        pre_BF = self.pre_activations(x_BD).relu()
        flat = pre_BF.flatten()
        values, indices = flat.topk(self.cfg.k * x_BD.shape[0], sorted=False)
        z_BF = torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_BF)
        positive = values[values > 0]
        if positive.numel() > 0:
            with torch.no_grad():
                if self.threshold < 0:  # the first batch sets it, so short runs are not biased towards 0
                    self.threshold.copy_(positive.min())
                else:
                    m = self.threshold_momentum
                    self.threshold.mul_(m).add_((1 - m) * positive.min())
        return z_BF, pre_BF

    def aux_reconstruction(
        self, pre_BF: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int
    ) -> torch.Tensor | None:
        """AuxK: the top ``k_aux`` of ReLU(pre) among dead latents per token, decoded without bias."""
        if dead_F is None or k_aux <= 0 or not bool(dead_F.any()):
            return None
        dead_pre = pre_BF.masked_fill(~dead_F, 0.0)
        top, where = dead_pre.topk(min(k_aux, int(dead_F.sum())), dim=1)
        return torch.zeros_like(pre_BF).scatter(1, where, top) @ self.W_dec_FD

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        z_BF, pre_BF = self.batch_select(x_BD)
        return self.dense_training_output(x_BD, z_BF, self.aux_reconstruction(pre_BF, dead_F, k_aux))
