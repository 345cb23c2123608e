"""The learned remasker g_φ of G-Star: an error predictor initialised from the denoiser.

Architecture: a copy of the denoiser's backbone (the transformer under its masked-LM head) — all blocks
(``init="all"``), only the first ``layers`` blocks (``init="first"``), or all blocks frozen with only the
head trained (``init="head"``) — and a one-logit linear head initialised to zero, so an untrained remasker
scores every position 0 and G-Star's Gumbel-top-k starts as Star+'s random choice. The time input is
fixed (the backbones here take none): g_φ(x̂0) ∈ ℝ^{B×L}, higher = more likely an error.

Training labels (one denoising step straight to t = 0): for clean contexts x0, draw t ~ U(δ, 1)
(δ = 1e-3), mask each position but the first with probability (1 − ε) t (ε = 1e-3), draw every [MASK]
from p_θ(· | x_t) (temperature ``temperature``, nucleus ``top_p``; 1 and 1 as in the official code) to
get x̂0, and label position ℓ an error, y^ℓ = 1, where x̂0^ℓ ≠ x0^ℓ (positions that were not masked are 0).
Losses, over the maskable positions P:

- ``bce``: mean_ℓ BCE(g^ℓ, y^ℓ);
- ``balanced``: weights N / (2 · max(#positives, 1)) on errors and N / (2 · max(#negatives, 1)) on the rest
  (N = |P| of the batch), then the weighted mean;
- ``ranking`` (RankNet, per sequence b with both classes present): (1 / (|P_b| |H_b|)) Σ_{i ∈ P_b, j ∈ H_b}
  softplus(g^j − g^i), averaged over those sequences (P_b errors, H_b the rest).

Error detection is scored on fixed validation contexts (their draws seeded by the run's seed): precision,
recall and F1 of g^ℓ > 0 (σ(g) > 0.5) against y, and the denoiser's error rate.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interlayer import atomic
from interlayer.diffusion.denoiser import Denoiser
from interlayer.diffusion.engine import draw_tokens
from interlayer.diffusion.schedule import SAMPLING_EPS, TRAIN_EPS, LogLinearSchedule, mask_at_times
from interlayer.errors import UserError

INITS = ("all", "first", "head")
LOSSES = ("bce", "balanced", "ranking")
WEIGHTS, META = "remasker.safetensors", "remasker.json"


@dataclass(frozen=True)
class RemaskerConfig:
    """How the remasker is built and trained (``interlayer diffusion train-remasker``)."""

    init: str = "all"
    """``all`` blocks of the denoiser fine-tuned, the ``first`` ``layers`` blocks, or the ``head`` only."""
    layers: int = 1
    """Blocks kept with ``init="first"``."""
    loss: str = "bce"
    """``bce``, ``balanced`` (class-balanced BCE) or ``ranking`` (pairwise RankNet)."""
    steps: int = 400
    """Optimiser steps."""
    batch_size: int = 32
    """Contexts per step."""
    lr: float = 1e-4
    """AdamW learning rate (the official 1e-4), constant after warm-up."""
    warmup_steps: int = 20
    """Steps of linear warm-up."""
    temperature: float = 1.0
    """Temperature of the denoiser's draw of x̂0 for the labels."""
    top_p: float = 1.0
    """Nucleus of that draw (1: the full distribution, as in the official training)."""
    seed: int = 0
    """Seeds every step's batch, times, masks and draws."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
    eval_every: int = 100
    """Steps between validation scores (and at the end)."""
    val_contexts: int = 128
    """Validation contexts scored."""

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise UserError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.loss not in LOSSES:
            raise UserError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("layers", "steps", "batch_size", "checkpoint_every", "val_contexts"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.eval_every < 0:
            raise UserError("lr must be positive, warmup_steps and eval_every non-negative")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise UserError("temperature must be positive and top_p in (0, 1]")


def _truncate(backbone: nn.Module, layers: int) -> None:
    """Keep only the first ``layers`` blocks of ``backbone`` (its ModuleList of num_hidden_layers)."""
    from interlayer.sites import _block_list

    path, blocks = _block_list(backbone)
    if layers > len(blocks):
        raise UserError(f"--layers {layers} exceeds the denoiser's {len(blocks)} blocks")
    parent = backbone.get_submodule(path.rsplit(".", 1)[0]) if "." in path else backbone
    setattr(parent, path.rsplit(".", 1)[-1], nn.ModuleList(list(blocks)[:layers]))
    config: Any = backbone.config
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]


class Remasker(nn.Module):
    """g_φ: the backbone of the module doc and a zero-initialised one-logit head."""

    def __init__(self, denoiser: Denoiser, init: str = "all", layers: int = 1) -> None:
        super().__init__()
        base = denoiser.network.base_model
        if base is denoiser.network:
            raise UserError(f"{denoiser.name}: no backbone under a masked-LM head to build a remasker from")
        self.backbone = copy.deepcopy(base)
        if init == "first":
            _truncate(self.backbone, layers)
        width = int(self.backbone.config.hidden_size)
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.backbone.requires_grad_(init != "head")
        self.init, self.layers = init, layers

    def forward(self, x0_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": x0_BL}
        if attention_mask_BL is not None and not bool(attention_mask_BL.all()):
            kwargs["attention_mask"] = attention_mask_BL
        hidden_BLD = self.backbone(**kwargs).last_hidden_state
        return self.head(hidden_BLD.to(self.head.weight.dtype)).squeeze(-1)


def error_labels(
    denoiser: Denoiser,
    x0_BL: torch.Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x̂0, y, maskable) of the module doc for clean contexts ``x0_BL`` (position 0 is never masked)."""
    batch, length = x0_BL.shape
    maskable_BL = torch.ones_like(x0_BL, dtype=torch.bool)
    maskable_BL[:, 0] = False
    t_B = torch.rand(batch, generator=generator, dtype=torch.float64) * (1 - SAMPLING_EPS) + SAMPLING_EPS
    x_t_BL = mask_at_times(x0_BL, t_B, denoiser.mask_id, maskable_BL, LogLinearSchedule(TRAIN_EPS), generator)
    u_BL = torch.rand(batch, length, generator=generator).to(x0_BL.device)
    masked_BL = x_t_BL == denoiser.mask_id
    x_hat_BL = x_t_BL.clone()
    if bool(masked_BL.any()):
        log_p_BLV = denoiser(x_t_BL)
        tokens_M, _ = draw_tokens(log_p_BLV[masked_BL], u_BL[masked_BL], temperature, top_p)
        x_hat_BL[masked_BL] = tokens_M
    return x_hat_BL, (x_hat_BL != x0_BL) & maskable_BL, maskable_BL


def remasker_loss(
    logits_BL: torch.Tensor, errors_BL: torch.Tensor, where_BL: torch.Tensor, kind: str
) -> torch.Tensor:
    """The loss ``kind`` of the module doc over the positions ``where_BL``."""
    y_BL = errors_BL.float()
    if kind == "ranking":
        terms = []
        for logit_L, y_L, keep_L in zip(logits_BL, errors_BL, where_BL, strict=True):
            pos, neg = logit_L[y_L & keep_L], logit_L[~y_L & keep_L]
            if len(pos) and len(neg):
                terms.append(F.softplus(neg.unsqueeze(0) - pos.unsqueeze(1)).mean())
        return torch.stack(terms).mean() if terms else logits_BL.sum() * 0.0
    logits_M, y_M = logits_BL[where_BL], y_BL[where_BL]
    if kind == "balanced":
        n, positives = float(len(y_M)), float(y_M.sum())
        weight_M = torch.where(y_M > 0, n / (2 * max(positives, 1.0)), n / (2 * max(n - positives, 1.0)))
        return F.binary_cross_entropy_with_logits(logits_M, y_M, weight=weight_M)
    return F.binary_cross_entropy_with_logits(logits_M, y_M)


def detection_scores(
    logits_BL: torch.Tensor, errors_BL: torch.Tensor, where_BL: torch.Tensor
) -> dict[str, float]:
    """Precision, recall and F1 of ``logits > 0`` as error predictions, and the error rate, over ``where_BL``."""
    predicted_M, actual_M = (logits_BL > 0)[where_BL], errors_BL[where_BL]
    hits = float((predicted_M & actual_M).sum())
    precision = hits / max(float(predicted_M.sum()), 1.0)
    recall = hits / max(float(actual_M.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "error_rate": float(actual_M.float().mean()) if len(actual_M) else 0.0,
    }


def save_remasker(
    remasker: Remasker, denoiser: Denoiser, folder: Path, config: RemaskerConfig, extra: dict[str, Any]
) -> None:
    """``remasker.safetensors`` (weights) and ``remasker.json`` (how to rebuild it, and for which denoiser)."""
    atomic.write_tensors(folder / WEIGHTS, dict(remasker.state_dict()))
    atomic.write_json(
        folder / META,
        {
            "denoiser": denoiser.name,
            "denoiser_fingerprint": denoiser.fingerprint(),
            "init": remasker.init,
            "layers": remasker.layers,
            "config": asdict(config),
            "version": 1,
            **extra,
        },
    )


def load_remasker(folder: str | Path, denoiser: Denoiser) -> Remasker:
    """The remasker in ``folder``, refused (one line) when it was trained for another denoiser."""
    folder = Path(folder)
    meta = atomic.read_json_object(folder / META, "remasker description (remasker.json)")
    if meta.get("denoiser_fingerprint") != denoiser.fingerprint():
        raise UserError(
            f"the remasker in {folder} was trained for denoiser {meta.get('denoiser')!r}, not for "
            f"{denoiser.name!r} (their weights differ); train one for it with `interlayer diffusion train-remasker`"
        )
    try:
        init, layers = str(meta["init"]), int(meta["layers"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{folder / META} is not a remasker description (no init/layers)") from None
    remasker = Remasker(denoiser, init, layers)
    tensors = atomic.read_tensors(folder / WEIGHTS, "remasker weights", device=str(denoiser.device))
    missing, unexpected = remasker.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(f"{folder / WEIGHTS} does not fit the remasker its remasker.json describes")
    return remasker.to(denoiser.device).eval().requires_grad_(False)
