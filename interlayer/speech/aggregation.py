"""Aggregation heads over a speech encoder's layer outputs: last layer, SUPERB's weighted sum, VARAN.

Notation: h_ℓ (ℓ = 1..N) are the outputs of the encoder's N transformer layers, ``hidden_states[1:]`` of a
transformers speech encoder (the CNN/embedding output ``hidden_states[0]`` is dropped, as in the official VARAN
code, deepvk/varan @05685be), stacked as ``h_BNTD``; ``mask_BT`` marks the valid frames.

- **Last layer**: h_N.
- **Weighted sum** (SUPERB / s3prl's featurizer): Σ_ℓ softmax(w)_ℓ · h_ℓ with learned scalars w (initialised
  equal, so the start is the mean of the layers).
- **VARAN**: one head per layer and a posterior over layers from the time-pooled features,
  q(ℓ | x) = softmax_ℓ(g(h̄_1..h̄_N)), h̄_ℓ = the masked mean of h_ℓ over time, g = a bias-free QKV projection,
  multi-head attention across the layer axis, and a linear map to one logit per layer (official code). The
  loss of a sample is Σ_ℓ q(ℓ|x)·loss_ℓ(x) + β·KL, averaged over the batch, where KL is, by default, the
  official code's KL(prior ‖ q) = Σ_ℓ p_ℓ (log p_ℓ − log q_ℓ) (``F.kl_div(log q, prior, "batchmean")``), or
  the ELBO's KL(q ‖ prior) = Σ_ℓ q_ℓ (log q_ℓ − log p_ℓ) with ``direction="q_prior"``. loss_ℓ is the per-sample
  loss of head ℓ (the official classification code uses each head's batch-mean cross-entropy for every sample,
  a quirk we do not copy). Classification predicts argmax_c Σ_ℓ q(ℓ|x)·log softmax(logits_ℓ)_c; for CTC
  the per-layer loss is the CTC loss divided by the number of encoder frames (official code).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

PRIORS = ("uniform", "geometric", "geometric_reversed", "chi2", "chi2_reversed")
KL_DIRECTIONS = ("prior_q", "q_prior")


def layer_prior(name: str, layers: int, p: float = 0.45, df: float = 2.0, nc: float = 10.0) -> torch.Tensor:
    """The prior p_ℓ over ``layers`` layers (float64, sums to 1), as the official code builds it:

    - ``uniform``: 1/N each;
    - ``geometric``: p·(1 − p)^i for i = 0..N−1, the missing mass added to the last entry;
    - ``chi2``: the non-central χ²(df, nc) density at N evenly spaced points between its 1% and 99% quantiles,
      times the spacing, the missing mass added to the first entry;
    - ``*_reversed``: the same, layer order flipped (``chi2_reversed``, df = 2, nc = 10, is the official
      default; it puts the mass on the top layers).
    """
    if layers < 1:
        raise ValueError(f"layers must be at least 1, not {layers}")
    base = name.removesuffix("_reversed")
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose from {', '.join(PRIORS)}")
    if base == "uniform":
        probs = np.full(layers, 1.0 / layers)
    elif base == "geometric":
        if not 0 < p < 1:
            raise ValueError(f"the geometric prior's p must be in (0, 1), not {p}")
        probs = np.array([(1 - p) ** i * p for i in range(layers)])
        probs[-1] += 1 - probs.sum()
    else:
        if not (df > 0 and nc >= 0):  # also refuses NaN
            raise ValueError(f"the χ² prior needs df > 0 and nc ≥ 0, not df={df}, nc={nc}")
        if layers == 1:
            probs = np.ones(1)
        else:
            lower, upper = stats.ncx2.ppf(0.01, df, nc), stats.ncx2.ppf(0.99, df, nc)
            points, step = np.linspace(lower, upper, layers, retstep=True)
            probs = stats.ncx2.pdf(points, df, nc) * step
            probs[0] -= probs.sum() - 1
    if name.endswith("_reversed"):
        probs = probs[::-1].copy()
    return torch.tensor(probs, dtype=torch.float64)


def masked_time_mean(h_BNTD: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """h̄ [batch, layers, width]: each layer's mean over the valid frames of each sample."""
    if mask_BT is None:
        return h_BNTD.mean(dim=2)
    weights_B1T1 = mask_BT.to(h_BNTD.dtype)[:, None, :, None]
    return (h_BNTD * weights_B1T1).sum(dim=2) / weights_B1T1.sum(dim=2).clamp_min(1.0)


def last_layer(h_BNTD: torch.Tensor) -> torch.Tensor:
    """h_N [batch, frames, width]."""
    return h_BNTD[:, -1]


class WeightedLayerSum(nn.Module):
    """Σ_ℓ softmax(w)_ℓ · h_ℓ over the N layers (SUPERB's featurizer), w initialised equal."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(layers))

    def forward(self, h_BNTD: torch.Tensor) -> torch.Tensor:
        probs_N = self.weights.softmax(dim=0).to(h_BNTD.dtype)
        return torch.einsum("n,bntd->btd", probs_N, h_BNTD)


class LayerPosterior(nn.Module):
    """The logits of q(ℓ | x) [batch, layers] from the pooled layer features h̄ [batch, layers, width]:
    Q, K, V = split(W_qkv h̄) (no bias), multi-head attention across the layer axis, one linear logit per layer."""

    def __init__(self, width: int, heads: int = 16) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"the posterior's {heads} heads must divide the width {width}")
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.logit = nn.Linear(width, 1)

    def forward(self, pooled_BND: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv(pooled_BND).chunk(3, dim=-1)
        attended_BND, _ = self.attention(query, key, value, need_weights=False)
        return self.logit(attended_BND).squeeze(-1)


def kl_to_prior(log_q_BN: torch.Tensor, prior_N: torch.Tensor, direction: str = "prior_q") -> torch.Tensor:
    """Per-sample KL [batch]: ``prior_q`` = KL(prior ‖ q) (the official code's), ``q_prior`` = KL(q ‖ prior)."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; choose from {', '.join(KL_DIRECTIONS)}")
    log_p_N = prior_N.to(log_q_BN.dtype).log()
    if direction == "prior_q":
        return (prior_N.to(log_q_BN.dtype) * (log_p_N - log_q_BN)).sum(dim=-1)
    return (log_q_BN.exp() * (log_q_BN - log_p_N)).sum(dim=-1)


def varan_loss(
    layer_losses_BN: torch.Tensor,
    posterior_logits_BN: torch.Tensor,
    prior_N: torch.Tensor,
    beta: float = 0.05,
    direction: str = "prior_q",
) -> torch.Tensor:
    """mean_b [ Σ_ℓ q(ℓ|x_b)·loss_ℓ(x_b) + β·KL_b ] with q = softmax(posterior logits)."""
    log_q_BN = posterior_logits_BN.log_softmax(dim=-1)
    expected_BN = log_q_BN.exp() * layer_losses_BN
    return (expected_BN.sum(dim=-1) + beta * kl_to_prior(log_q_BN, prior_N, direction)).mean()


def varan_class_log_probs(posterior_logits_BN: torch.Tensor, logits_BNC: torch.Tensor) -> torch.Tensor:
    """The prediction scores [batch, classes]: Σ_ℓ q(ℓ|x)·log softmax(logits_ℓ) (argmax is the prediction)."""
    q_BN1 = posterior_logits_BN.softmax(dim=-1)[..., None]
    return (q_BN1 * logits_BNC.log_softmax(dim=-1)).sum(dim=1)


def ctc_layer_losses(
    log_probs_NBTV: torch.Tensor,
    targets: torch.Tensor,
    input_lengths_B: torch.Tensor,
    target_lengths_B: torch.Tensor,
    blank: int = 0,
) -> torch.Tensor:
    """loss_ℓ(x_b) [batch, layers]: each layer head's CTC loss of sample b divided by its number of frames."""
    losses = [
        F.ctc_loss(
            log_probs_BTV.transpose(0, 1),
            targets,
            input_lengths_B,
            target_lengths_B,
            blank=blank,
            reduction="none",
            zero_infinity=True,
        )
        / input_lengths_B.to(log_probs_BTV.dtype)
        for log_probs_BTV in log_probs_NBTV
    ]
    return torch.stack(losses, dim=1)
