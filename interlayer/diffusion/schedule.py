"""The absorbing-state ([MASK]) forward process with the log-linear schedule, and the MDLM training objective.

Forward process (MDLM, Sahoo et al. 2024): each token of a clean sequence x0 is replaced by [MASK]
independently with probability 1 − α_t at time t ∈ [0, 1]. The log-linear schedule is
σ(t) = −log(1 − (1 − ε) t), α_t = exp(−σ(t)) = 1 − (1 − ε) t, so the mask probability is (1 − ε) t ≈ t
(ε = 1e-3 as in MDLM's training; samplers use ε = 0, so that t = 1 is all masks and t = 0 is clean).

SUBS parameterisation: the denoiser's distribution over x0 puts no mass on [MASK] and copies every
position that is not masked (:func:`interlayer.diffusion.denoiser.subs_log_probs`). Under it the continuous-time
negative ELBO is

    L = E_{t ~ U(0, 1)} [ α'_t / (1 − α_t) · Σ_{ℓ : x_t^ℓ = MASK} log p_θ(x0^ℓ | x_t) ]
      = E_t [ (1 − ε) / ((1 − ε) t) · Σ_{masked ℓ} −log p_θ(x0^ℓ | x_t) ]  =  E_t [ (1/t) Σ_{masked ℓ} CE ],

reported per token (divided by the number of positions that could be masked). Times are drawn with
MDLM's low-discrepancy rule: for a batch of B rows, t_b = ((u + b / B) mod 1) · (1 − δ) + δ with one
u ~ U(0, 1) and δ = 1e-3 (``sampling_eps``), which lowers the variance of the estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TRAIN_EPS = 1e-3
"""ε of the training schedule (α_1 = ε: a sliver of tokens survive at t = 1, keeping the weight finite)."""
SAMPLING_EPS = 1e-3
"""δ: training times are drawn from [δ, 1], as in MDLM."""


@dataclass(frozen=True)
class LogLinearSchedule:
    """α_t = 1 − (1 − ε) t: the probability that a token is still clean at time t."""

    eps: float = 0.0
    """ε: 0 for sampling (t = 1 is all [MASK]); :data:`TRAIN_EPS` for training."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """α_t = 1 − (1 − ε) t."""
        return 1.0 - (1.0 - self.eps) * torch.as_tensor(t, dtype=torch.float64)

    def mask_prob(self, t: torch.Tensor | float) -> torch.Tensor:
        """1 − α_t = (1 − ε) t: the probability that a token is [MASK] at time t."""
        return 1.0 - self.alpha(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """−α'_t / (1 − α_t) = 1 / t: the weight of a masked token's cross-entropy in the NELBO."""
        return 1.0 / t


def low_discrepancy_times(
    batch: int, generator: torch.Generator | None = None, sampling_eps: float = SAMPLING_EPS
) -> torch.Tensor:
    """t_b = ((u + b/B) mod 1)(1 − δ) + δ for b = 0..B−1, one u ~ U(0, 1): float64 [B]."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    t_B = (u + torch.arange(batch, dtype=torch.float64) / batch) % 1.0
    return t_B * (1.0 - sampling_eps) + sampling_eps


def mask_at_times(
    x0_BL: torch.Tensor,
    t_B: torch.Tensor,
    mask_id: int,
    maskable_BL: torch.Tensor,
    schedule: LogLinearSchedule,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_t: each maskable position of row b is [MASK] with probability 1 − α_{t_b}, independently."""
    p_B1 = schedule.mask_prob(t_B).to(torch.float32).unsqueeze(1)
    u_BL = torch.rand(x0_BL.shape, generator=generator)
    masked_BL = (u_BL.to(x0_BL.device) < p_B1.to(x0_BL.device)) & maskable_BL
    return torch.where(masked_BL, torch.full_like(x0_BL, mask_id), x0_BL)


def mdlm_loss(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x0_BL: torch.Tensor,
    mask_id: int,
    maskable_BL: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    schedule: LogLinearSchedule = LogLinearSchedule(TRAIN_EPS),
    reduction: str = "mean",
) -> torch.Tensor:
    """The MDLM NELBO of the module doc, per maskable token (``reduction="sum"``: summed over tokens).

    ``logits_fn(x_t)`` returns the denoiser's logits [B, L, V]; the SUBS parameterisation is applied here
    (the [MASK] logit is excluded), and only masked positions contribute, so copying is implicit.
    Randomness (the times and the masks) comes from ``generator`` (CPU).
    """
    if maskable_BL is None:
        maskable_BL = torch.ones_like(x0_BL, dtype=torch.bool)
    t_B = low_discrepancy_times(x0_BL.shape[0], generator)
    x_t_BL = mask_at_times(x0_BL, t_B, mask_id, maskable_BL, schedule, generator)
    logits_BLV = logits_fn(x_t_BL).float()
    logits_BLV = logits_BLV.index_fill(-1, torch.tensor([mask_id], device=logits_BLV.device), float("-inf"))
    masked_BL = x_t_BL == mask_id
    ce_BL = F.cross_entropy(logits_BLV.transpose(1, 2), x0_BL, reduction="none")
    weight_B1 = schedule.loss_weight(t_B).to(ce_BL).unsqueeze(1)
    total = (ce_BL * weight_B1 * masked_BL).sum()
    return total if reduction == "sum" else total / maskable_BL.sum().clamp(min=1)
