"""The policy-gradient objective of RL steering (arXiv:2505.18706): advantages, the k3 KL estimator, the loss.

For each prompt p, G completions o_{p,1..G} are sampled at temperature 1 and scored by a verifier, r_{p,i}
(+1 correct, −1 wrong for a yes/no verifier). Advantages, with no normalisation by the standard deviation:

- RLOO (the paper's default): A_{p,i} = r_{p,i} − (1/(G−1))·Σ_{j≠i} r_{p,j}
  (= G/(G−1)·(r_{p,i} − mean_j r_{p,j}));
- GRPO without std (the paper's v1): A_{p,i} = r_{p,i} − (1/G)·Σ_j r_{p,j}.

The k3 estimator of KL(π_θ ‖ π_ref) at a sampled token (Schulman, "Approximating KL divergence"), with
Δ = log π_ref(o_t) − log π_θ(o_t): k3 = exp(Δ) − Δ − 1 ≥ 0, unbiased, 0 iff the log-probabilities agree.

The loss of one rollout batch, one gradient step per batch (so the PPO ratio is 1 at the step and its clip
never acts; the gradient of A·π_θ/π_old at π_θ = π_old is A·∇log π_θ):

    L = −(1/N)·Σ_{p,i} Σ_{t ∈ o_{p,i}} [ A_{p,i}·log π_θ(o_{p,i,t} | ·) − β·k3_{p,i,t} ]

with N = Σ_{p,i} |o_{p,i}| the number of completion tokens in the batch (a token-level mean, so long and short
completions weigh per token) and β the KL coefficient (0 by default, as in the paper).
"""

from __future__ import annotations

import torch

ALGORITHMS = ("rloo", "grpo")
"""How advantages are computed from the rewards of one prompt's G samples."""


def advantages(rewards_PG: torch.Tensor, algorithm: str = "rloo") -> torch.Tensor:
    """A [P, G] from rewards r [P, G] (one row per prompt) by the formulas of the module docstring."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    group = rewards_PG.shape[1]
    if algorithm == "grpo":
        return rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if group < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    others_PG = rewards_PG.sum(dim=1, keepdim=True) - rewards_PG
    return rewards_PG - others_PG / (group - 1)


def kl_k3(logp_policy: torch.Tensor, logp_reference: torch.Tensor) -> torch.Tensor:
    """k3 = exp(Δ) − Δ − 1 with Δ = log π_ref − log π_θ, elementwise."""
    delta = logp_reference - logp_policy
    return torch.exp(delta) - delta - 1


def policy_loss(
    logp_NT: torch.Tensor,
    advantages_N: torch.Tensor,
    mask_NT: torch.Tensor,
    logp_reference_NT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    tokens: float | None = None,
) -> torch.Tensor:
    """L of the module docstring for N completions: log π_θ of each completion token [N, T], the completion's
    advantage [N], a 0/1 mask of real completion tokens [N, T], and (for β > 0) log π_ref [N, T]. ``tokens``
    is the normaliser N of the whole rollout batch when these rows are one micro-batch of it (default: the
    tokens of these rows)."""
    mask = mask_NT.to(logp_NT.dtype)
    if tokens is None:
        tokens = max(float(mask.sum()), 1.0)
    objective_NT = advantages_N.to(logp_NT.dtype).unsqueeze(1) * logp_NT
    if kl_coef:
        if logp_reference_NT is None:
            raise ValueError("a KL coefficient needs the reference log-probabilities")
        objective_NT = objective_NT - kl_coef * kl_k3(logp_NT, logp_reference_NT)
    return -(objective_NT * mask).sum() / tokens
