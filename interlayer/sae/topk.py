"""TopK and BatchTopK sparse autoencoders.

TopK (Gao et al. 2024):
    z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc)),   x̂ = W_decᵀ z + b_dec,
with W_enc, W_dec of shape F×d (one row per latent).

BatchTopK (Bussmann et al. 2024): in training, keep the k·B largest entries of ReLU(pre) over the whole
batch of B tokens (so k is a per-token mean), and track θ, a running mean (momentum 0.99, starting from the
first batch's value, so short runs are not biased towards 0) of the smallest kept value per batch. At inference it is a JumpReLU with that threshold: z_f = ReLU(pre_f) · 1[pre_f > θ].

Decoder hygiene shared by both: decoder rows at unit norm (:meth:`SparseAutoencoder.project_decoder_grad_`
removes the gradient component along each row before the step, :meth:`normalise_decoder_` rescales after
it). After a run that trained on scaled inputs c·x, :meth:`fold_input_scale_` rewrites the weights so the
SAE reads raw x: W_enc ← c·W_enc, b_dec ← b_dec / c, W_dec ← W_dec / c (codes z are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from interlayer.sae.config import SAEConfig
from interlayer.sae.kernels import fused_topk_encode, sparse_decode


@dataclass
class TrainingOutput:
    """What one training forward pass returns."""

    x_hat_BD: torch.Tensor
    """The reconstruction."""
    aux_hat_BD: torch.Tensor | None
    """The AuxK reconstruction of the residual from dead latents (no bias), or None when none are dead."""
    fired_F: torch.Tensor
    """Bool mask of latents that fired on at least one token of the batch."""
    active: float
    """Number of (token, latent) pairs active in the batch (L0 = active / tokens)."""


class SparseAutoencoder(nn.Module):
    """Parameters and decoder hygiene common to every SAE architecture."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_enc_FD = nn.Parameter(torch.empty(cfg.latents, cfg.d_in))
        self.b_enc_F = nn.Parameter(torch.zeros(cfg.latents))
        self.W_dec_FD = nn.Parameter(torch.empty(cfg.latents, cfg.d_in))
        self.b_dec_D = nn.Parameter(torch.zeros(cfg.d_in))

    def initialise_(self, generator: torch.Generator, b_dec_D: torch.Tensor | None = None) -> None:
        """Random unit decoder rows, encoder = decoder (W_enc = W_decᵀ as maps), b_enc = 0, b_dec = data mean."""
        with torch.no_grad():
            self.W_dec_FD.copy_(torch.randn(self.W_dec_FD.shape, generator=generator))
            self.normalise_decoder_()
            self.W_enc_FD.copy_(self.W_dec_FD)
            self.b_enc_F.zero_()
            self.b_dec_D.copy_(b_dec_D if b_dec_D is not None else torch.zeros_like(self.b_dec_D))

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from each decoder row's gradient its component along that (unit) row."""
        if self.W_dec_FD.grad is not None:
            along_F1 = (self.W_dec_FD.grad * self.W_dec_FD).sum(dim=1, keepdim=True)
            self.W_dec_FD.grad.sub_(along_F1 * self.W_dec_FD)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        self.W_enc_FD.mul_(scale)
        self.b_dec_D.div_(scale)
        self.W_dec_FD.div_(scale)

    def pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        """W_enc (x − b_dec) + b_enc, dense [B, F]."""
        return torch.addmm(self.b_enc_F, x_BD - self.b_dec_D, self.W_enc_FD.T)

    def decode(self, z_BF: torch.Tensor) -> torch.Tensor:
        """x̂ = W_decᵀ z + b_dec for dense codes."""
        return z_BF @ self.W_dec_FD + self.b_dec_D

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense codes z [B, F] as used at inference."""
        raise NotImplementedError

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """The reconstruction x̂ of ``x_BD`` at inference."""
        return self.decode(self.encode(x_BD))

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        raise NotImplementedError


class TopKSAE(SparseAutoencoder):
    """z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc)), x̂ = W_decᵀ z + b_dec (fused encoder, sparse decoder)."""

    def encode_sparse(self, x_BD: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k (value, index) pairs per token (``k`` defaults to the trained k)."""
        k = self.cfg.k if k is None else k
        values_BK, indices_BK, _, _ = fused_topk_encode(x_BD - self.b_dec_D, self.W_enc_FD, self.b_enc_F, k)
        return values_BK, indices_BK

    def encode(self, x_BD: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Dense codes keeping the top ``k`` (default: the trained k) latents per token."""
        values_BK, indices_BK = self.encode_sparse(x_BD, k)
        return x_BD.new_zeros(x_BD.shape[0], self.cfg.latents).scatter_(1, indices_BK, values_BK)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        values_BK, indices_BK = self.encode_sparse(x_BD)
        return sparse_decode(values_BK, indices_BK, self.W_dec_FD) + self.b_dec_D

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        values_BK, indices_BK, aux_values, aux_indices = fused_topk_encode(
            x_BD - self.b_dec_D, self.W_enc_FD, self.b_enc_F, self.cfg.k, dead_F, k_aux
        )
        x_hat_BD = sparse_decode(values_BK, indices_BK, self.W_dec_FD) + self.b_dec_D
        aux_hat = sparse_decode(aux_values, aux_indices, self.W_dec_FD) if aux_indices.shape[1] > 0 else None
        active_BK = values_BK > 0
        fired_F = torch.zeros(self.cfg.latents, dtype=torch.bool, device=x_BD.device)
        fired_F[indices_BK[active_BK]] = True
        return TrainingOutput(x_hat_BD, aux_hat, fired_F, float(active_BK.sum()))


class BatchTopKSAE(SparseAutoencoder):
    """BatchTopK in training (k·B largest over the batch); JumpReLU with the learned θ at inference."""

    threshold_momentum = 0.99

    threshold: torch.Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((), -1.0))  # -1: not set yet

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = self.pre_activations(x_BD)
        return pre_BF.relu() * (pre_BF > self.threshold)

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
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
        aux_hat = None
        if dead_F is not None and k_aux > 0 and bool(dead_F.any()):
            dead_pre = pre_BF.masked_fill(~dead_F, 0.0)
            top, where = dead_pre.topk(min(k_aux, int(dead_F.sum())), dim=1)
            aux_hat = torch.zeros_like(pre_BF).scatter(1, where, top) @ self.W_dec_FD
        active_BF = z_BF > 0
        return TrainingOutput(self.decode(z_BF), aux_hat, active_BF.any(0), float(active_BF.sum()))


ARCHITECTURE_CLASSES: dict[str, type[SparseAutoencoder]] = {"topk": TopKSAE, "batchtopk": BatchTopKSAE}


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """An uninitialised SAE of ``cfg.architecture``."""
    return ARCHITECTURE_CLASSES[cfg.architecture](cfg)
