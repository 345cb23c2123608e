"""SAE evaluation metrics, each defined once. N tokens x_t (kept tokens only: special tokens are excluded),
reconstructions x̂_t, codes z_t ∈ R^F.

Reconstruction (pooled over the whole evaluation set, accumulated in float64):
    EV  = 1 − Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖²,   x̄ the mean over the whole set
    FVU = 1 − EV
    ev_legacy_per_token = mean_t (1 − ‖x_t − x̂_t‖² / ‖x_t − x̄_b‖²), x̄_b the mean of t's batch (the older
          SAELens per-token ratio; reported for comparison only, labelled as such)
    L0  = mean_t #{f : z_tf ≠ 0}
    dead latents  = #{f : z_tf = 0 for every t};  dense latents = #{f : freq_f > 0.1}, freq_f = #{t : z_tf ≠ 0} / N

Downstream, causal LMs (next-token targets y_{t+1} that are not special tokens; the SAE replaces the site's
value at kept positions only):
    CE_clean, CE_sae, CE_zero = mean −log p(y_{t+1} | ·) with the site untouched, replaced by x̂, replaced by 0
    frac_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean),   ΔCE = CE_sae − CE_clean
    KL = mean_t Σ_v p_clean(v) (log p_clean(v) − log p_sae(v))       (KL(clean ‖ spliced), nats per token)

Downstream, encoders without an LM head: the sentence embedding u = mean over tokens of the last hidden state
(masked mean pooling, as sentence-transformers does for MiniLM), and
    pooled_cosine_sae  = mean over contexts of cos(u_clean, u_sae)
    pooled_cosine_zero = mean over contexts of cos(u_clean, u_zero)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ReconstructionMetrics:
    """Accumulates the reconstruction metrics over batches of (x, x̂, z)."""

    def __init__(self, latents: int) -> None:
        self.n = 0
        self.sum_x_D: torch.Tensor | None = None
        self.sum_sq_x = 0.0
        self.sum_sq_err = 0.0
        self.sum_legacy = 0.0
        self.nonzeros = 0
        self.fires_F = torch.zeros(latents, dtype=torch.float64)
        self.sum_z_F = torch.zeros(latents, dtype=torch.float64)

    def update(self, x_ND: torch.Tensor, x_hat_ND: torch.Tensor, z_NF: torch.Tensor) -> None:
        x, x_hat = x_ND.double(), x_hat_ND.double()
        err_N = (x - x_hat).pow(2).sum(1)
        self.sum_x_D = x.sum(0) if self.sum_x_D is None else self.sum_x_D + x.sum(0)
        self.sum_sq_x += float(x.pow(2).sum())
        self.sum_sq_err += float(err_N.sum())
        self.sum_legacy += float((1 - err_N / (x - x.mean(0)).pow(2).sum(1).clamp_min(1e-12)).sum())
        active_NF = z_NF != 0
        self.nonzeros += int(active_NF.sum())
        self.fires_F += active_NF.sum(0).double().cpu()
        self.sum_z_F += z_NF.sum(0).double().cpu()
        self.n += x.shape[0]

    def result(self) -> dict[str, float]:
        assert self.sum_x_D is not None, "no batch was evaluated"
        total = self.sum_sq_x - float(self.sum_x_D.pow(2).sum()) / self.n
        ev = 1 - self.sum_sq_err / total
        freq_F = self.fires_F / self.n
        return {
            "tokens": self.n,
            "explained_variance": ev,
            "fvu": 1 - ev,
            "ev_legacy_per_token": self.sum_legacy / self.n,
            "mse": self.sum_sq_err / self.n,
            "l0": self.nonzeros / self.n,
            "dead_latents": int((self.fires_F == 0).sum()),
            "dead_fraction": float((self.fires_F == 0).double().mean()),
            "dense_latents": int((freq_F > 0.1).sum()),
        }

    @property
    def frequencies_F(self) -> torch.Tensor:
        """Fraction of tokens on which each latent fires."""
        return self.fires_F / max(self.n, 1)

    @property
    def mean_active_F(self) -> torch.Tensor:
        """Mean activation of each latent over the tokens where it fires (0 for dead latents)."""
        return self.sum_z_F / self.fires_F.clamp_min(1)


def next_token_ce_sum(
    logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, keep_BT: torch.Tensor
) -> tuple[float, int]:
    """(Σ −log p(y_{t+1}), count) over positions whose target y_{t+1} is kept."""
    logp = logits_BTV[:, :-1].float().log_softmax(-1)
    nll_BT = -logp.gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
    mask = keep_BT[:, 1:]
    return float(nll_BT[mask].sum()), int(mask.sum())


def kl_sum(clean_BTV: torch.Tensor, other_BTV: torch.Tensor, keep_BT: torch.Tensor) -> float:
    """Σ over the same positions as :func:`next_token_ce_sum` of KL(p_clean ‖ p_other)."""
    p = clean_BTV[:, :-1].float().log_softmax(-1)
    q = other_BTV[:, :-1].float().log_softmax(-1)
    kl_BT = (p.exp() * (p - q)).sum(-1)
    return float(kl_BT[keep_BT[:, 1:]].sum())


def pooled_embedding(hidden_BTD: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Masked mean of the last hidden state over tokens, [B, D]."""
    mask = attention_mask_BT.unsqueeze(-1).to(hidden_BTD.dtype)
    return (hidden_BTD * mask).sum(1) / mask.sum(1).clamp_min(1)


def cosine_sum(a_BD: torch.Tensor, b_BD: torch.Tensor) -> float:
    """Σ over rows of cos(a_b, b_b)."""
    return float(F.cosine_similarity(a_BD.float(), b_BD.float(), dim=-1).sum())
