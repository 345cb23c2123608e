"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024), ``--architecture matryoshka``.

Nested dictionaries: with prefix widths m₁ < m₂ < … < m_P = F (``--prefixes``), the first m_p latents must
reconstruct x on their own. Codes z are BatchTopK's (k·B largest of ReLU(pre) over the batch); the
reconstruction of prefix p is x̂_p = Σ_{f < m_p} z_f W_dec[f] + b_dec, and the loss term is

    Σ_p Σ_b ‖x_b − x̂_{p,b}‖²

(summed over prefixes, normalised by Σ‖x − x̄‖² in the trainer). x̂_p is built as a running sum of the
segments [m_{p−1}, m_p), so the P reconstructions cost one decode. Inference is BatchTopK's (a JumpReLU with
the learned θ over all F latents); the default prefixes are F/16, F/4, F.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interlayer.errors import UserError
from interlayer.sae.base import TrainingOutput
from interlayer.sae.batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclass(frozen=True, kw_only=True)
class MatryoshkaConfig(BatchTopKConfig):
    """A Matryoshka BatchTopK SAE."""

    architecture: str = "matryoshka"
    prefixes: tuple[int, ...] = ()
    """Increasing dictionary widths ending at ``latents``; empty means (F/16, F/4, F)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        prefixes = tuple(int(p) for p in self.prefixes)
        if not prefixes:
            prefixes = tuple(sorted({max(1, self.latents // 16), max(1, self.latents // 4), self.latents}))
        if any(b <= a for a, b in zip(prefixes, prefixes[1:], strict=False)) or prefixes[0] < 1:
            raise UserError(
                f"--prefixes must be increasing positive widths, got {','.join(map(str, prefixes))}"
            )
        if prefixes[-1] != self.latents:
            raise UserError(
                f"--prefixes must end at latents ({self.latents}), got {','.join(map(str, prefixes))}"
            )
        object.__setattr__(self, "prefixes", prefixes)


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK codes, loss summed over nested dictionary prefixes."""

    config_class = MatryoshkaConfig
    cfg: MatryoshkaConfig

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        z_BF, pre_BF = self.batch_select(x_BD)
        x_hat_BD = self.b_dec_D.expand_as(x_BD)
        recon = x_BD.new_zeros(())
        start = 0
        for end in self.cfg.prefixes:
            x_hat_BD = x_hat_BD + z_BF[:, start:end] @ self.W_dec_FD[start:end]
            recon = recon + (x_hat_BD - x_BD).pow(2).sum()
            start = end
        active_BF = z_BF > 0
        return TrainingOutput(
            recon,
            x_hat_BD,
            self.aux_reconstruction(pre_BF, dead_F, k_aux),
            active_BF.any(0),
            float(active_BF.sum()),
        )
