"""JumpReLU SAE (Rajamanoharan et al., arXiv:2407.14435), ``--architecture jumprelu --l0-coefficient λ``.

    pre = W_enc (x − b_dec) + b_enc,   z_f = pre_f · H(pre_f − θ_f),   x̂ = W_decᵀ z + b_dec,

with a learned threshold θ_f > 0 per latent, stored as log θ (the paper's parameterisation) and saved as
``threshold`` (θ itself, as SAELens and Gemma Scope store it). Training loss terms: Σ_b ‖x_b − x̂_b‖² and the
L0 penalty λ · Σ_b Σ_f H(pre_bf − θ_f); the trainer divides the first by Σ‖x − x̄‖² and the second by the
batch size, so λ prices one active latent per token in units of FVU (λ = 1e-3: one more latent per token
must buy 0.001 of FVU).

H has zero derivative almost everywhere, so θ is trained with the paper's straight-through estimators, with
the rectangle kernel K(u) = 1[|u| < ½] and bandwidth ε:
    ∂/∂θ [pre · H(pre − θ)] := −(θ/ε) K((pre − θ)/ε),     ∂/∂pre [pre · H(pre − θ)] = H(pre − θ),
    ∂/∂θ H(pre − θ)         := −(1/ε) K((pre − θ)/ε),     ∂/∂pre H(pre − θ) = 0.
The paper uses ε = 0.001 on activations normalised to E‖x‖² = 1; here inputs are normalised to E‖x‖² = d
(pre-activations are √d larger), and the default ε = 0.05, θ₀ = 0.01 follow SAELens' defaults for that
normalisation. Decoder rows are kept at unit norm as for every SAE here. No AuxK (the L0 penalty alone
decides which latents fire). Loaded JumpReLU SAEs (θ given) run inference the same way; a loaded θ may be 0
(log θ = −∞: that latent is a plain ReLU), which SAEs read from other libraries need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interlayer.errors import UserError
from interlayer.sae.base import DenseEncoderSAE, TrainingOutput
from interlayer.sae.config import SAEConfig


@dataclass(frozen=True, kw_only=True)
class JumpReLUConfig(SAEConfig):
    """A JumpReLU SAE: a learned threshold per latent, trained with an L0 penalty."""

    architecture: str = "jumprelu"
    l0_coefficient: float = 1e-3
    """λ, the price of one active latent per token in units of FVU."""
    bandwidth: float = 0.05
    """ε, the width of the straight-through estimators' rectangle kernel."""
    initial_threshold: float = 0.01
    """θ at initialisation, for every latent."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bandwidth", "initial_threshold"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.l0_coefficient >= 0:
            raise UserError(f"l0_coefficient must be at least 0, got {self.l0_coefficient}")


def _kernel_BF(pre_BF: torch.Tensor, threshold_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """K((pre − θ)/ε) for the rectangle kernel K(u) = 1[|u| < ½]."""
    return ((pre_BF - threshold_F).abs() < bandwidth / 2).to(pre_BF.dtype)


class JumpReLUFn(torch.autograd.Function):
    """(pre_BF, threshold_F, ε) -> pre · H(pre − θ), with the straight-through estimator for θ."""

    @staticmethod
    def forward(ctx: Any, pre_BF: torch.Tensor, threshold_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return pre_BF * (pre_BF > threshold_F)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_BF,) = grads
        pre_BF, threshold_F = ctx.saved_tensors
        grad_pre = grad_BF * (pre_BF > threshold_F)
        kernel_BF = _kernel_BF(pre_BF, threshold_F, ctx.bandwidth)
        grad_threshold = -(threshold_F / ctx.bandwidth) * (grad_BF * kernel_BF).sum(0)
        return grad_pre, grad_threshold, None


class StepFn(torch.autograd.Function):
    """(pre_BF, threshold_F, ε) -> H(pre − θ), with the straight-through estimator for θ (none for pre)."""

    @staticmethod
    def forward(ctx: Any, pre_BF: torch.Tensor, threshold_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > threshold_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_BF,) = grads
        pre_BF, threshold_F = ctx.saved_tensors
        kernel_BF = _kernel_BF(pre_BF, threshold_F, ctx.bandwidth)
        return None, -(grad_BF * kernel_BF).sum(0) / ctx.bandwidth, None


class JumpReLUSAE(DenseEncoderSAE):
    """z = pre · H(pre − θ) with a learned θ per latent; trained with an L0 penalty."""

    config_class = JumpReLUConfig
    cfg: JumpReLUConfig

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.log_threshold_F = nn.Parameter(torch.zeros(cfg.latents))

    @property
    def threshold_F(self) -> torch.Tensor:
        return self.log_threshold_F.exp()

    def initialise_(self, generator: torch.Generator, b_dec_D: torch.Tensor | None = None) -> None:
        super().initialise_(generator, b_dec_D)
        with torch.no_grad():
            self.log_threshold_F.fill_(math.log(self.cfg.initial_threshold))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return super().file_tensors() | {"threshold": self.threshold_F.detach()}

    @torch.no_grad()
    def load_file_tensors_(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_file_tensors_(tensors)
        bad_F = ~(tensors["threshold"] >= 0)  # NaN counts as bad
        if bool(bad_F.any()):
            raise UserError(
                f"{int(bad_F.sum())} JumpReLU threshold(s) are negative or NaN, but θ must be ≥ 0 "
                "(z = pre·1[pre > θ]; θ = 0 is a ReLU); the file is damaged or not a JumpReLU SAE"
            )
        self.log_threshold_F.copy_(tensors["threshold"].log())

    def _codes(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        pre_BF = self.pre_activations(x_BD)
        return pre_BF * (pre_BF > self.threshold_F)

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        pre_BF = self.pre_activations(x_BD)
        threshold_F = self.threshold_F
        z_BF = JumpReLUFn.apply(pre_BF, threshold_F, self.cfg.bandwidth)
        penalty = self.cfg.l0_coefficient * StepFn.apply(pre_BF, threshold_F, self.cfg.bandwidth).sum()
        return self.dense_training_output(x_BD, z_BF, penalty=penalty)
