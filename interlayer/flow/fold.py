"""Parameter folding for SAE Match (arXiv:2410.07656): put every feature's parameters in the scale of the
reconstructions it makes, so that features of two SAEs can be compared parameter by parameter.

Every SAE with a dense encoder computes its pre-activations as pre = W_enc (x − b_dec) + b_enc, which we
rewrite in the input-independent form pre = W_enc x + c with c = b_enc − W_enc b_dec (the form Gemma Scope
stores, so that the bias term compares what the paper compares). With a per-feature scale θ_f > 0:

    W_enc'[f] = W_enc[f] / θ_f,     c'_f = c_f / θ_f,     W_dec'[f] = θ_f · W_dec[f].

For a JumpReLU SAE (θ its thresholds, z_f = pre_f · 1[pre_f > θ_f]) the folded SAE, with thresholds θ' = 1,
computes exactly the same function: pre'_f = pre_f / θ_f, z'_f = z_f / θ_f and W_dec'ᵀ z' = W_decᵀ z
(:func:`fold_jumprelu` returns that SAE; a test checks ``encode``-then-decode and ``forward`` are unchanged).
A BatchTopK SAE folds its single inference threshold the same way. A feature with θ_f = 0 (a plain ReLU
latent of an imported SAE) keeps scale 1.

TopK-family SAEs (TopK, HierarchicalTopK, ReLU) have no threshold. Their scale is the data-dependent part of
SAE Match: θ_f = the mean activation of feature f over the tokens where it fires (:func:`activation_scales`),
and features that never fire on those tokens take the median scale of the others. Folding a TopK SAE is
used for matching only (dividing pre-activations by per-feature scales would change which k are selected).

``fold`` chooses the scale: ``"threshold"`` (JumpReLU and BatchTopK only; anything else is an error naming the
architecture), ``"data"`` (needs activations), ``"none"`` (θ = 1), or ``"auto"``: thresholds where the SAE
has them, else data scales when activations are given, else none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interlayer.errors import UserError
from interlayer.sae import BatchTopKSAE, JumpReLUSAE, SparseAutoencoder, build_sae
from interlayer.sae.base import DenseEncoderSAE

FOLDS = ("auto", "threshold", "data", "none")
"""The ways of choosing each feature's scale θ_f."""


@dataclass(frozen=True)
class FoldedFeatures:
    """One SAE's per-feature parameters after folding (float32, on the SAE's device)."""

    W_dec_FD: torch.Tensor
    """θ_f · W_dec[f]."""
    W_enc_FD: torch.Tensor | None
    """W_enc[f] / θ_f (None for SAEs without a dense encoder: KronSAE, boosted SAEs)."""
    bias_F: torch.Tensor | None
    """(b_enc − W_enc b_dec)_f / θ_f, the input-independent encoder bias (None without a dense encoder)."""
    scale_F: torch.Tensor
    """θ_f, the scale folded in."""
    fold: str
    """Which scale it was: ``threshold``, ``data`` or ``none``."""


def thresholds(sae: SparseAutoencoder) -> torch.Tensor | None:
    """θ [F] of a JumpReLU SAE, or BatchTopK's inference threshold broadcast to every feature; else None."""
    if isinstance(sae, JumpReLUSAE):
        return sae.threshold_F.detach().float()
    if isinstance(sae, BatchTopKSAE) and float(sae.threshold) > 0:
        return sae.threshold.detach().float().expand(sae.cfg.latents).clone()
    return None


@torch.no_grad()
def activation_scales(sae: SparseAutoencoder, x_ND: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """θ_f = mean of z_f over the tokens of ``x_ND`` where z_f > 0; the median of those for features that
    never fire there (1 when none fires)."""
    device = sae.W_dec_FD.device
    sum_F = torch.zeros(sae.cfg.latents, dtype=torch.float64, device=device)
    count_F = torch.zeros(sae.cfg.latents, dtype=torch.float64, device=device)
    for start in range(0, x_ND.shape[0], batch_size):
        z_BF = sae.encode(x_ND[start : start + batch_size].to(device)).double()
        sum_F += z_BF.clamp_min(0).sum(0)
        count_F += (z_BF > 0).sum(0)
    fired_F = count_F > 0
    scale_F = torch.ones(sae.cfg.latents, dtype=torch.float64, device=device)
    scale_F[fired_F] = sum_F[fired_F] / count_F[fired_F]
    if bool(fired_F.any()):
        scale_F[~fired_F] = scale_F[fired_F].median()
    return scale_F.float()


def _scale(sae: SparseAutoencoder, fold: str, x_ND: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    if fold not in FOLDS:
        raise UserError(f"unknown fold {fold!r}; choose one of {', '.join(FOLDS)}")
    where = sae.cfg.site or "this SAE"
    theta_F = thresholds(sae)
    if fold == "threshold" or (fold == "auto" and theta_F is not None):
        if theta_F is None:
            why = (
                "its inference threshold was never set (it did not train)"
                if isinstance(sae, BatchTopKSAE)
                else "only JumpReLU and BatchTopK SAEs have them"
            )
            raise UserError(
                f"the {sae.cfg.architecture} SAE at {where} has no thresholds to fold ({why}); fold with data "
                "scales (--fold data, with --model and --data) or none"
            )
        return torch.where(theta_F > 0, theta_F, torch.ones_like(theta_F)), "threshold"
    if fold == "data" or (fold == "auto" and x_ND is not None):
        if x_ND is None:
            raise UserError(f"--fold data needs activations at {where} (pass --model and --data)")
        return activation_scales(sae, x_ND), "data"
    return torch.ones(sae.cfg.latents, device=sae.W_dec_FD.device), "none"


@torch.no_grad()
def fold_features(
    sae: SparseAutoencoder, fold: str = "auto", x_ND: torch.Tensor | None = None
) -> FoldedFeatures:
    """The folded per-feature parameters of ``sae`` (see the module docstring for ``fold``)."""
    scale_F, used = _scale(sae, fold, x_ND)
    W_dec_FD = sae.W_dec_FD.detach().float() * scale_F[:, None]
    if not isinstance(sae, DenseEncoderSAE):
        return FoldedFeatures(W_dec_FD, None, None, scale_F, used)
    W_enc_FD = sae.W_enc_FD.detach().float()
    bias_F = sae.b_enc_F.detach().float() - W_enc_FD @ sae.b_dec_D.detach().float()
    return FoldedFeatures(W_dec_FD, W_enc_FD / scale_F[:, None], bias_F / scale_F, scale_F, used)


@torch.no_grad()
def fold_jumprelu(sae: JumpReLUSAE) -> JumpReLUSAE:
    """A copy of a JumpReLU SAE with its thresholds folded in (θ' = 1 where θ > 0): the same function."""
    theta_F = sae.threshold_F.detach()
    scale_F = torch.where(theta_F > 0, theta_F, torch.ones_like(theta_F))
    out = build_sae(sae.cfg).to(sae.W_dec_FD.device)
    assert isinstance(out, JumpReLUSAE)
    out.load_state_dict(sae.state_dict())
    # pre = W_enc (x − b_dec) + b_enc: dividing W_enc and b_enc by θ divides pre by θ, whatever b_dec is
    out.W_enc_FD.div_(scale_F[:, None])
    out.b_enc_F.div_(scale_F)
    out.W_dec_FD.mul_(scale_F[:, None])
    out.log_threshold_F.copy_(torch.where(theta_F > 0, torch.zeros_like(theta_F), sae.log_threshold_F))
    return out
