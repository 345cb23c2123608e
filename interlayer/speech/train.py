"""``interlayer varan train``: fine-tune a speech encoder with last-layer, weighted-sum or VARAN heads, resumably.

One run = one encoder (``--model``), one task (classification of ``label`` or CTC of ``text``), one aggregation
and one fine-tuning mode (:mod:`interlayer.speech.model`). The labels (classification: the sorted label set of
the train split) or the vocabulary (CTC: the blank, then the sorted characters of the train transcripts) are fixed
by the train split; a validation or test clip outside them is refused. Step k's batch (``batch_size`` clips drawn
without replacement) comes from a generator seeded by (seed, k), so :func:`interlayer.training.run` resumes
after a kill with the same result (bit for bit on the same device and thread count). AdamW with a linear
warm-up then a constant rate: the heads, the posterior and the weighted sum at ``head_lr`` (1e-3), the encoder
(LoRA adapters or all its weights) at ``lr`` (1e-3 for LoRA, 1e-4 for full fine-tuning: the official rates),
decoupled weight decay 0.05 on matrices, gradient norm clipped at 1. The official code uses one rate for
everything and a cosine schedule; the heads' own rate lets a short full fine-tuning run train its heads too.

The run folder ends with ``model/`` (``varan.json``: the base encoder's name, the head config, labels or
vocabulary; ``trained.safetensors``: every trained tensor: heads, posterior, weighted-sum scalars, LoRA adapters,
or the whole encoder after full fine-tuning), ``summary.json`` (test metrics, mean posterior per layer),
``history.json`` and ``report.html`` (curves, the posterior over layers).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interlayer import atomic
from interlayer.audio import feature_batch, frame_lengths
from interlayer.errors import UserError
from interlayer.speech.corpus import SpeechSet
from interlayer.speech.metrics import error_rates
from interlayer.speech.model import (
    AGGREGATIONS,
    MODES,
    TASKS,
    HeadConfig,
    VaranModel,
    greedy_ctc_decode,
    set_trainable,
)
from interlayer.training import ParamGroup, TrainingLoop, check_settings, run

BLANK_SYMBOL = "<blank>"
HEAD_PARTS = ("heads.", "posterior.", "weighted.")
"""Names of the parameters that train at ``head_lr``."""


@dataclass(frozen=True)
class VaranTrainConfig:
    """One ``varan train`` run."""

    task: str = "classification"
    """``classification`` (the clips' labels) or ``ctc`` (their transcripts)."""
    aggregation: str = "varan"
    """``last``, ``weighted`` or ``varan``."""
    mode: str = "lora"
    """``frozen``, ``full`` or ``lora``."""
    steps: int = 300
    """Optimiser steps (may grow on a rerun: the schedule is constant after warm-up)."""
    batch_size: int = 16
    """Clips per step."""
    lr: float = 0.0
    """The encoder's learning rate; 0 picks the official one: 1e-3 with LoRA, 1e-4 for full fine-tuning."""
    head_lr: float = 1e-3
    """Learning rate of the heads, the posterior and the weighted-sum scalars."""
    weight_decay: float = 0.05
    """Decoupled weight decay on matrices."""
    warmup_steps: int = 15
    """Linear warm-up of every learning rate."""
    lora_rank: int = 16
    """LoRA rank r (α = r)."""
    prior: str = "chi2_reversed"
    """VARAN's prior over layers."""
    prior_df: float = 2.0
    """Degrees of freedom of the χ² prior."""
    prior_nc: float = 10.0
    """Non-centrality of the χ² prior."""
    prior_p: float = 0.45
    """p of the geometric prior."""
    beta: float = 0.05
    """Weight of VARAN's KL term."""
    kl_direction: str = "prior_q"
    """``prior_q`` (official) or ``q_prior``."""
    posterior_heads: int = 16
    """Attention heads of VARAN's posterior network."""
    seed: int = 0
    """Seeds the heads, the adapters and every batch."""
    eval_every: int = 100
    """Validation metrics every this many steps (and at the end)."""
    checkpoint_every: int = 50
    """Checkpoint every this many steps."""
    eval_batch_size: int = 32
    """Clips per evaluation forward pass."""

    def __post_init__(self) -> None:
        for name, allowed in (("task", TASKS), ("aggregation", AGGREGATIONS), ("mode", MODES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(allowed)}")
        for name in ("steps", "batch_size", "lora_rank", "eval_every", "checkpoint_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not (self.lr >= 0 and math.isfinite(self.lr)) or not (
            self.head_lr > 0 and math.isfinite(self.head_lr)
        ):
            raise UserError("lr must not be negative (0: the official rate) and head_lr must be positive")
        if not self.weight_decay >= 0 or self.warmup_steps < 0:
            raise UserError("weight_decay and warmup_steps must not be negative")

    @property
    def encoder_lr(self) -> float:
        """``lr``, or the official rate of the mode."""
        return self.lr or (1e-4 if self.mode == "full" else 1e-3)

    def head_config(self, outputs: int) -> HeadConfig:
        """The :class:`HeadConfig` of this run for a head with ``outputs`` classes or symbols."""
        shared = {f.name for f in fields(HeadConfig)} & {f.name for f in fields(self)}
        return HeadConfig(outputs=outputs, **{name: getattr(self, name) for name in shared})


@dataclass
class Encoded:
    """A split ready for the model: its clips, and their class indices or CTC symbol sequences."""

    waves: list[np.ndarray]
    labels_N: torch.Tensor | None
    targets: list[list[int]]


def output_names(cfg: VaranTrainConfig, train: SpeechSet) -> list[str]:
    """The head's outputs: the sorted train labels, or the blank and the sorted transcript characters."""
    if cfg.task == "classification":
        if not train.labels:
            raise UserError(f"{train.name}: the train split has no labels; use --task ctc or labelled data")
        names = sorted(set(train.labels))
        if len(names) < 2:
            raise UserError(f"{train.name}: the train split has only the label {names}; need at least 2")
        return names
    if not any(train.texts):
        raise UserError(f"{train.name}: the train split has no transcripts; use --task classification")
    return [BLANK_SYMBOL] + sorted(set("".join(train.texts)))


def _check_lengths(encoder: Any, speech: SpeechSet, targets: list[list[int]], split: str) -> None:
    """Refuse a clip too short for the encoder (no frame), or for its CTC transcript: a CTC path needs one frame
    per symbol plus a blank between two equal neighbours."""
    frames = frame_lengths(encoder, torch.tensor([len(w) for w in speech.waves])).tolist()
    for i, count in enumerate(frames):
        if count < 1:
            raise UserError(
                f"{speech.name} {split} clip {i}: {len(speech.waves[i])} samples is shorter than the encoder's "
                "receptive field (no frame); drop it or pad it"
            )
        if targets:
            needed = len(targets[i]) + sum(a == b for a, b in zip(targets[i], targets[i][1:], strict=False))
            if count < needed:
                raise UserError(
                    f"{speech.name} {split} clip {i}: {count} encoder frames cannot hold its transcript "
                    f"{speech.texts[i]!r} (CTC needs {needed})"
                )


def encode(task: str, speech: SpeechSet, names: list[str], split: str, encoder: Any) -> Encoded:
    """``speech`` as class indices / symbol sequences over ``names``; a label or character outside them, an
    empty split and a clip too short (:func:`_check_lengths`) are refused."""
    if not len(speech):
        raise UserError(f"{speech.name}: the {split} split has no clips")
    index = {name: i for i, name in enumerate(names)}
    if task == "classification":
        unknown = sorted(set(speech.labels) - set(index)) if speech.labels else ["(none: unlabelled)"]
        if unknown:
            raise UserError(
                f"{speech.name} {split} split: labels {unknown[:5]} are not among the head's labels "
                f"{names}; give data with the same label set"
            )
        _check_lengths(encoder, speech, [], split)
        return Encoded(speech.waves, torch.tensor([index[label] for label in speech.labels]), [])
    unknown = sorted(set("".join(speech.texts)) - set(index))
    if unknown:
        raise UserError(
            f"{speech.name} {split} split: characters {unknown[:5]} are not in the head's vocabulary "
            f"{''.join(names[1:])!r}"
        )
    targets = [[index[c] for c in text] for text in speech.texts]
    if not all(targets):
        raise UserError(f"{speech.name} {split} split: a clip has an empty transcript")
    _check_lengths(encoder, speech, targets, split)
    return Encoded(speech.waves, None, targets)


def batch_loss(
    model: VaranModel, feature_extractor: Any, data: Encoded, rows: list[int], device: torch.device
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss on clips ``rows`` of ``data``, and the numbers to log."""
    input_values, attention_mask = feature_batch(feature_extractor, [data.waves[i] for i in rows])
    output = model(input_values.to(device), attention_mask.to(device))
    if data.labels_N is not None:
        loss, _ = model.loss(output, labels_B=data.labels_N[rows].to(device))
    else:
        targets = torch.tensor([s for i in rows for s in data.targets[i]], device=device)
        lengths = torch.tensor([len(data.targets[i]) for i in rows], device=device)
        loss, _ = model.loss(output, targets=targets, target_lengths_B=lengths)
    logged = {}
    if output.posterior_logits_BN is not None:
        q_N = output.head_weights_BN.detach().mean(0)
        logged["expected_layer"] = float((q_N * torch.arange(1, len(q_N) + 1, device=q_N.device)).sum())
    return loss, logged


@torch.no_grad()
def evaluate(
    model: VaranModel,
    feature_extractor: Any,
    data: Encoded,
    names: list[str],
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``data``: accuracy (classification) or CER and WER (CTC, :mod:`metrics`), the
    same for each head alone (VARAN: layer ℓ's head; its prediction with q put on that layer), and the mean
    posterior over layers. Clips run in length order (less padding)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data.waves)), key=lambda i: len(data.waves[i]))
    heads = len(model.heads)
    correct, per_head_correct = 0, [0] * heads
    hypotheses: list[str] = []
    per_head_hypotheses: list[list[str]] = [[] for _ in range(heads)]
    references: list[str] = []
    q_sum = torch.zeros(model.layers if model.posterior is not None else 1)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_values, attention_mask = feature_batch(feature_extractor, [data.waves[i] for i in rows])
        output = model(input_values.to(device), attention_mask.to(device))
        scores = model.scores(output).cpu()
        head_scores = output.logits.float().log_softmax(dim=-1).cpu()
        q_sum += output.head_weights_BN.float().sum(0).cpu()
        mask = output.frame_mask_BT.cpu()
        if data.labels_N is not None:
            labels = data.labels_N[rows]
            correct += int((scores.argmax(-1) == labels).sum())
            for head in range(heads):
                per_head_correct[head] += int((head_scores[:, head].argmax(-1) == labels).sum())
            continue

        def text(symbols: list[int]) -> str:
            return "".join(names[s] for s in symbols)

        references += [text(data.targets[i]) for i in rows]
        hypotheses += [text(s) for s in greedy_ctc_decode(scores, mask)]
        for head in range(heads):
            per_head_hypotheses[head] += [text(s) for s in greedy_ctc_decode(head_scores[:, head], mask)]
    model.train(was_training)
    metrics: dict[str, Any] = {"clips": len(order), "mean_posterior": (q_sum / len(order)).tolist()}
    if data.labels_N is not None:
        metrics["accuracy"] = correct / len(order)
        metrics["head_accuracy"] = [c / len(order) for c in per_head_correct]
    else:
        metrics |= error_rates(references, hypotheses)
        metrics["head_cer"] = [error_rates(references, h)["cer"] for h in per_head_hypotheses]
        metrics["examples"] = [
            {"reference": r, "hypothesis": h} for r, h in zip(references[:5], hypotheses[:5], strict=True)
        ]
    return metrics


def _head_main_metric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: metrics[k] for k in ("accuracy", "cer", "wer") if k in metrics}


def build_model(encoder: Any, cfg: VaranTrainConfig, outputs: int, pass_attention_mask: bool) -> VaranModel:
    """Heads (drawn from ``cfg.seed``) on ``encoder``, set to ``cfg.mode`` (adapters drawn after the heads)."""
    torch.manual_seed(cfg.seed)
    model = VaranModel(encoder, cfg.head_config(outputs), pass_attention_mask)
    set_trainable(model, cfg.mode, cfg.lora_rank)
    return model


def train(
    out: Path,
    cfg: VaranTrainConfig,
    model_name: str,
    encoder: Any,
    feature_extractor: Any,
    splits: dict[str, SpeechSet],
    settings: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``encoder`` (loaded from ``model_name``) on ``splits`` (train, validation, test) into ``out``
    (resuming from its checkpoint); returns the summary also written to ``out/summary.json``."""
    out = Path(out)
    # what fixes the trained weights must match on a rerun; steps may grow, and how often the run validates,
    # checkpoints or batches its evaluation may change
    bookkeeping = ("steps", "eval_every", "checkpoint_every", "eval_batch_size")
    check_settings(
        out, {"config": {k: v for k, v in asdict(cfg).items() if k not in bookkeeping}} | settings, ()
    )
    names = output_names(cfg, splits["train"])
    encoded = {split: encode(cfg.task, speech, names, split, encoder) for split, speech in splits.items()}
    device = next(encoder.parameters()).device
    pass_mask = bool(getattr(feature_extractor, "return_attention_mask", True))
    model = build_model(encoder, cfg, len(names), pass_mask).to(device)
    train_data = encoded["train"]
    if len(train_data.waves) < cfg.batch_size:
        raise UserError(f"the train split has {len(train_data.waves)} clips, fewer than --batch-size")

    def step_fn(step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        rows = torch.randperm(len(train_data.waves), generator=generator)[: cfg.batch_size].tolist()
        return batch_loss(model, feature_extractor, train_data, rows, device)

    def validate(step: int) -> dict[str, float]:
        metrics = evaluate(
            model, feature_extractor, encoded["validation"], names, cfg.eval_batch_size, device
        )
        return _head_main_metric(metrics)

    loop = TrainingLoop(
        model,
        step_fn,
        cfg.steps,
        cfg.encoder_lr,
        cfg.seed,
        cfg.warmup_steps,
        cfg.weight_decay,
        groups=tuple(
            ParamGroup(part, cfg.head_lr, cfg.weight_decay, decay_vectors=False) for part in HEAD_PARTS
        ),
        checkpoint_every=cfg.checkpoint_every,
        evaluate=validate,
        eval_every=cfg.eval_every,
    )
    ran = run(loop, out, f"varan {cfg.aggregation} {cfg.mode}", progress)
    test = evaluate(model, feature_extractor, encoded["test"], names, cfg.eval_batch_size, device)
    trainable = {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
    summary = {
        "model": model_name,
        "config": asdict(cfg),
        "outputs": names,
        "layers": model.layers,
        "steps_run_now": ran,
        "trainable_parameters": sum(t.numel() for t in trainable.values()),
        "train_clips": len(train_data.waves),
        "test": test,
        "weighted_sum": model.weighted.weights.softmax(0).tolist() if model.weighted is not None else None,
        "final_train_loss": loop.history[-1]["loss"],
    } | settings
    staging = out / ".result.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    atomic.write_tensors(staging / "model" / "trained.safetensors", trainable)
    atomic.write_json(
        staging / "model" / "varan.json",
        {
            "base_model": model_name,
            "base_model_sha256": settings.get("model_sha256"),
            "mode": cfg.mode,
            "lora_rank": cfg.lora_rank,
            "head": asdict(model.cfg),
            "outputs": names,
            "version": 1,
        },
    )
    atomic.write_json(staging / "history.json", loop.history)
    atomic.write_json(staging / "summary.json", summary)
    atomic.swap_in(staging, out)
    from interlayer.speech.report import write_run_report

    write_run_report(out, summary, loop.history)
    return summary
