"""``interlayer diffusion train`` (an MDLM denoiser) and ``train-remasker`` (G-Star's error predictor).

Both read clean contexts of ``context_len`` tokens packed from ``--data`` (:func:`interlayer.data.pack_contexts`:
[BOS] + body, documents joined by EOS), train through :mod:`interlayer.training` (resumable,
bit-identical after a kill at equal thread count and device) and write their result only at the end,
into a temporary name swapped in, so a previous good result survives a crash.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from interlayer import atomic
from interlayer.data import packed_contexts
from interlayer.diffusion.denoiser import Denoiser, mask_token_id
from interlayer.diffusion.remasker import (
    Remasker,
    RemaskerConfig,
    detection_scores,
    error_labels,
    remasker_loss,
    save_remasker,
)
from interlayer.diffusion.schedule import mdlm_loss
from interlayer.errors import UserError
from interlayer.training import TrainingLoop, check_settings, draw_batch, run


@dataclass(frozen=True)
class DenoiserTrainConfig:
    """``interlayer diffusion train``: a masked diffusion LM trained with the MDLM objective."""

    d_model: int = 192
    """Hidden size of a new model."""
    layers: int = 4
    """Blocks of a new model."""
    heads: int = 4
    """Attention heads of a new model."""
    intermediate: int = 512
    """MLP width of a new model."""
    context_len: int = 64
    """Tokens per context (and the length the model samples)."""
    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 32
    """Contexts per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate, constant after warm-up."""
    warmup_steps: int = 100
    """Steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (MDLM uses none)."""
    seed: int = 0
    """Seeds the initialisation and every step's batch, times and masks."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    eval_every: int = 0
    """Steps between validation NELBOs (0: at the end only)."""
    val_contexts: int = 64
    """Validation contexts scored."""

    def __post_init__(self) -> None:
        for name in (
            "d_model",
            "layers",
            "heads",
            "intermediate",
            "steps",
            "batch_size",
            "checkpoint_every",
            "val_contexts",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.context_len < 4:
            raise UserError(f"context_len must be at least 4, got {self.context_len}")
        if self.d_model % self.heads:
            raise UserError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.eval_every < 0:
            raise UserError("lr must be positive; warmup_steps, weight_decay and eval_every non-negative")


def _new_masked_lm(tokenizer: Any, cfg: DenoiserTrainConfig) -> Any:
    """A new ModernBERT masked LM over ``tokenizer``'s vocabulary, [MASK] added to it when missing."""
    from transformers import ModernBertForMaskedLM

    from interlayer.zoo import MASK, masked_lm_config

    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": MASK})
    if tokenizer.mask_token_id != len(tokenizer) - 1:
        raise UserError(
            "the tokenizer's mask token must be its last id to build a new model; use another tokenizer"
        )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id or 0
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id or 0
    torch.manual_seed(cfg.seed)
    return ModernBertForMaskedLM(
        masked_lm_config(
            len(tokenizer), cfg.d_model, cfg.layers, cfg.heads, cfg.intermediate, cfg.context_len, bos, eos
        )
    )


def train_denoiser(
    out: Path,
    data: str,
    cfg: DenoiserTrainConfig,
    init: str = "",
    tokenizer_name: str = "zoo:code-lm",
    progress: bool = True,
) -> dict[str, Any]:
    """Train a masked diffusion LM into ``out/model`` (a transformers folder ``--model``/``--denoiser`` accept).

    ``init``: a masked LM to continue from (``zoo:code-mdlm``, a folder, a hub id); empty: a new model with
    ``cfg``'s sizes over the tokenizer of ``tokenizer_name``. Loss: the MDLM NELBO of
    :mod:`interlayer.diffusion.schedule`, every position but the first (BOS) maskable."""
    from transformers import AutoTokenizer

    from interlayer.models import load_model, resolve_model_source

    out = Path(out)
    settings = {
        "config": asdict(cfg),
        "data": data,
        "init": init,
        "tokenizer": init or tokenizer_name,
        "version": 1,
    }
    check_settings(out, settings, may_change=())
    if init:
        loaded = load_model(init)
        if loaded.head != "masked_lm":
            raise UserError(f"--init {init!r} is a {loaded.head.replace('_', ' ')}, not a masked LM")
        network, tokenizer = loaded.model, loaded.tokenizer
        mask_id = mask_token_id(tokenizer, network.config, init)
        network.requires_grad_(True)
    else:
        source, local_only = resolve_model_source(tokenizer_name)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        network = _new_masked_lm(tokenizer, cfg)
        mask_id = int(tokenizer.mask_token_id)
    train_NL = packed_contexts(tokenizer, data, "train", cfg.context_len)
    val_NL = packed_contexts(tokenizer, data, "validation", cfg.context_len, cfg.val_contexts)
    if len(train_NL) < cfg.batch_size:
        raise UserError(
            f"{data}: {len(train_NL)} training contexts, fewer than --batch-size {cfg.batch_size}"
        )
    maskable = torch.ones(cfg.context_len, dtype=torch.bool)
    maskable[0] = False

    def nelbo(x0_BL: torch.Tensor, generator: torch.Generator, reduction: str = "mean") -> torch.Tensor:
        return mdlm_loss(
            lambda x_t: network(input_ids=x_t).logits,
            x0_BL,
            mask_id,
            maskable.expand_as(x0_BL),
            generator,
            reduction=reduction,
        )

    def step_fn(step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return nelbo(draw_batch(train_NL, cfg.batch_size, generator), generator), {}

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        generator = torch.Generator().manual_seed(cfg.seed)
        total = sum(float(nelbo(val_NL[i : i + 32], generator, "sum")) for i in range(0, len(val_NL), 32))
        return {"nelbo": total / (len(val_NL) * (cfg.context_len - 1))}

    loop = TrainingLoop(
        network,
        step_fn,
        cfg.steps,
        cfg.lr,
        cfg.seed,
        cfg.warmup_steps,
        cfg.weight_decay,
        checkpoint_every=cfg.checkpoint_every,
        evaluate=evaluate,
        eval_every=cfg.eval_every,
    )
    ran = run(loop, out, "training the denoiser (MDLM)", progress)
    staging = out / ".result.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    network.save_pretrained(staging / "model")
    tokenizer.save_pretrained(staging / "model")
    summary = _summary(loop, ran, {"model": str(out / "model"), "train_contexts": len(train_NL)})
    atomic.write_json(staging / "history.json", loop.history)
    atomic.write_json(staging / "summary.json", summary)
    atomic.swap_in(staging, out)
    return summary


def _summary(loop: TrainingLoop, ran: int, extra: dict[str, Any]) -> dict[str, Any]:
    last = loop.history[-1] if loop.history else {}
    return {
        "steps": loop.steps,
        "steps_run_now": ran,
        **{k: v for k, v in last.items() if k != "step"},
        **extra,
    }


def train_remasker(
    denoiser: Denoiser,
    tokenizer: Any,
    out: Path,
    data: str,
    cfg: RemaskerConfig,
    context_len: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train G-Star's remasker for ``denoiser`` on ``data`` into ``out`` (:mod:`interlayer.diffusion.remasker`).

    ``context_len`` 0: the denoiser's ``max_position_embeddings``."""
    out = Path(out)
    length = context_len or int(denoiser.network.config.max_position_embeddings)
    settings = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "steps"},
        "steps": cfg.steps,
        "data": data,
        "denoiser": denoiser.name,
        "denoiser_fingerprint": denoiser.fingerprint(),
        "context_len": length,
        "version": 1,
    }
    check_settings(out, settings, may_change=("steps",))
    train_NL = packed_contexts(tokenizer, data, "train", length)
    val_NL = packed_contexts(tokenizer, data, "validation", length, cfg.val_contexts)
    if len(train_NL) < cfg.batch_size:
        raise UserError(
            f"{data}: {len(train_NL)} training contexts, fewer than --batch-size {cfg.batch_size}"
        )
    remasker = Remasker(denoiser, cfg.init, cfg.layers).to(denoiser.device)
    device = denoiser.device

    def step_fn(step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x0_BL = draw_batch(train_NL, cfg.batch_size, generator).to(device)
        x_hat_BL, errors_BL, where_BL = error_labels(denoiser, x0_BL, generator, cfg.temperature, cfg.top_p)
        logits_BL = remasker(x_hat_BL)
        return remasker_loss(logits_BL, errors_BL, where_BL, cfg.loss), detection_scores(
            logits_BL.detach(), errors_BL, where_BL
        )

    validation = _validation_set(denoiser, val_NL.to(device), cfg)

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        logits = torch.cat([remasker(x) for x, _, _ in validation])
        errors = torch.cat([e for _, e, _ in validation])
        where = torch.cat([w for _, _, w in validation])
        return detection_scores(logits, errors, where) | {
            "loss": float(remasker_loss(logits, errors, where, cfg.loss))
        }

    loop = TrainingLoop(
        remasker,
        step_fn,
        cfg.steps,
        cfg.lr,
        cfg.seed,
        cfg.warmup_steps,
        checkpoint_every=cfg.checkpoint_every,
        evaluate=evaluate,
        eval_every=cfg.eval_every,
    )
    ran = run(loop, out, f"training the remasker ({cfg.init}, {cfg.loss})", progress)
    staging = out / ".result.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    summary = _summary(
        loop,
        ran,
        {"remasker": str(out), "trainable_parameters": sum(p.numel() for p in loop.trainable().values())},
    )
    save_remasker(remasker, denoiser, staging, cfg, {"context_len": length, "data": data})
    atomic.write_json(staging / "history.json", loop.history)
    atomic.write_json(staging / "summary.json", summary)
    atomic.swap_in(staging, out)
    return summary


def _validation_set(
    denoiser: Denoiser, val_NL: torch.Tensor, cfg: RemaskerConfig
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed (x̂0, y, maskable) batches of the validation contexts, drawn from the run's seed."""
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        return [
            error_labels(denoiser, val_NL[i : i + 32], generator, cfg.temperature, cfg.top_p)
            for i in range(0, len(val_NL), 32)
        ]
