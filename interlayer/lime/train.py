"""``interlayer lime train``: LIMe and its baselines trained from scratch on the same tokens, resumably.

Every architecture of one run gets the same width, depth, tokenizer, data, batches (step k's contexts are
drawn by a generator seeded from (seed, k)), token count and initial weights: the Llama weights are drawn
once from ``seed`` and LIMe models start from them, their routers initialised as in the official code (the own
layer's block the identity, earlier blocks uniform ±sqrt(3/fan_in)) from the same seed. Routers train in their
own AdamW group (``router_lr``, default 1e-2, no weight decay; the dynamic router's projection at the same
rate with weight decay) against the base ``lr`` (1e-3, weight decay on matrices but the tied embedding, as in
the official code). Each architecture trains in ``out/<architecture>/`` with :func:`interlayer.training.run` (checkpoints
every ``checkpoint_every`` steps; a rerun after ``kill -9`` continues and ends with the same weights, bit for
bit on the same device with the same thread count) and ends as a transformers folder ``out/<architecture>/model``.

Compute is counted as training FLOPs, 3 × the forward FLOPs per token (:func:`forward_flops_per_token`) × tokens.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from interlayer import atomic
from interlayer.data import packed_contexts
from interlayer.errors import UserError
from interlayer.lime.configuration import LimeConfig
from interlayer.lime.denseformer import DenseFormerConfig, DenseFormerForCausalLM
from interlayer.lime.modeling import LimeForCausalLM, kv_head_count
from interlayer.training import ParamGroup, TrainingLoop, check_settings, draw_batch, run
from interlayer.zoo import next_token_loss, validation_loss

ARCHITECTURES = ("llama", "lime", "lime-dynamic", "denseformer")
"""``llama``: the baseline; ``lime``: static routers (the paper's model); ``lime-dynamic``: plus the per-token
router; ``denseformer``: Llama with a depth-weighted average of all earlier block outputs after each block."""


@dataclass(frozen=True)
class LimeTrainConfig:
    """One ``lime train`` run: the model shape shared by every architecture, and the optimisation."""

    layers: int = 8
    """Decoder blocks."""
    d_model: int = 128
    """Hidden size."""
    heads: int = 4
    """Query heads."""
    kv_heads: int = 4
    """Key/value heads R (the router mixes R·(r+1) sources into R heads); must divide ``heads``."""
    intermediate: int = 352
    """Width of the SwiGLU MLP."""
    context_len: int = 128
    """Tokens per training context (and the model's maximum positions)."""
    batch_size: int = 16
    """Contexts per optimiser step."""
    steps: int = 600
    """Optimiser steps (may grow on a rerun: the schedule is constant after warm-up)."""
    lr: float = 1e-3
    """AdamW learning rate of everything but the routers."""
    router_lr: float = 1e-2
    """AdamW learning rate of the router parameters (no weight decay), as in the official code."""
    weight_decay: float = 0.1
    """Decoupled weight decay on the base model's matrices."""
    warmup_steps: int = 50
    """Linear warm-up of every learning rate."""
    seed: int = 0
    """Seeds the initial weights and every batch."""
    eval_every: int = 100
    """Validation loss every this many steps (and at the end)."""
    val_contexts: int = 128
    """Validation contexts scored (evenly spaced over the split)."""
    checkpoint_every: int = 50
    """Checkpoint every this many steps."""

    def __post_init__(self) -> None:
        for name in ("layers", "d_model", "heads", "kv_heads", "intermediate", "context_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("steps", "eval_every", "val_contexts", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise UserError(f"d_model {self.d_model} must split into {self.heads} heads of even width")
        if self.heads % self.kv_heads:
            raise UserError(f"kv_heads {self.kv_heads} must divide heads {self.heads}")
        for name in ("lr", "router_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, not {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise UserError("weight_decay and warmup_steps must not be negative")


def llama_config(cfg: LimeTrainConfig, tokenizer: Any) -> LlamaConfig:
    """The baseline's config over ``tokenizer``'s vocabulary (embeddings tied to the LM head, as the zoo's)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.context_len,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def new_model(architecture: str, cfg: LimeTrainConfig, tokenizer: Any) -> PreTrainedModel:
    """The architecture's initial model: Llama's weights drawn from ``cfg.seed``; LIMe models take them and draw
    their routers after (from the same seed, so ``lime`` and ``lime-dynamic`` share their static routers);
    DenseFormer takes them with its averages at the identity."""
    if architecture not in ARCHITECTURES:
        raise UserError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    base = llama_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    llama = LlamaForCausalLM(base)
    if architecture == "llama":
        return llama
    if architecture == "denseformer":
        dense = DenseFormerForCausalLM(DenseFormerConfig(**base.to_dict()))
        missing, unexpected = dense.load_state_dict(llama.state_dict(), strict=False)
        assert not unexpected and all(name.startswith("model.dwa.") for name in missing), (
            missing,
            unexpected,
        )
        return dense
    router = "dynamic" if architecture == "lime-dynamic" else "static"
    lime = LimeForCausalLM(LimeConfig(**{**base.to_dict(), "lime_router": router}))
    missing, unexpected = lime.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and all(".router." in name for name in missing), (missing, unexpected)
    torch.manual_seed(cfg.seed + 1)  # the static routers alone, in layer order: the same for lime-dynamic
    for lime_router in lime.routers():
        lime_router.reset_static()
    return lime


def forward_flops_per_token(config: Any, context_len: int) -> float:
    """Forward FLOPs per token: 2 × every weight-matrix multiply (attention projections, MLP, LM head), plus
    the causal attention products 2·2·H·d_head·(T+1)/2 per layer, plus LIMe's mixes 2·R·(r+1)R·2·d_head per
    layer r ≥ 1 (and, with the dynamic router, its projection 2·d·R·(r+1)R and a second mix), or DenseFormer's
    averages 2·d·(i+2) after block i."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = int(config.num_attention_heads), kv_head_count(config)
    head_dim = config.head_dim or d // heads
    per_layer = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * config.intermediate_size
    flops = 2.0 * (layers * per_layer + d * config.vocab_size)
    flops += layers * 4.0 * heads * head_dim * (context_len + 1) / 2
    if isinstance(config, DenseFormerConfig):
        flops += sum(2.0 * d * (i + 2) for i in range(layers))
    if isinstance(config, LimeConfig):
        for r in range(1, layers):
            sources = (r + 1) * kv_heads
            mix = 2.0 * kv_heads * sources * 2 * head_dim
            flops += mix if config.lime_router == "static" else 2 * mix + 2.0 * d * kv_heads * sources
    return flops


def train_architecture(
    architecture: str,
    cfg: LimeTrainConfig,
    tokenizer: Any,
    train_NT: torch.Tensor,
    val_NT: torch.Tensor,
    out: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one architecture into ``out`` (resuming from its checkpoint); its summary."""
    model = new_model(architecture, cfg, tokenizer)
    step_starts: list[float] = []

    def step_fn(step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        step_starts.append(time.perf_counter())
        return next_token_loss(model, draw_batch(train_NT, cfg.batch_size, generator)), {}

    def evaluate(step: int) -> dict[str, float]:
        return {"loss": validation_loss(model, val_NT, batch_size=32)}

    loop = TrainingLoop(
        model,
        step_fn,
        cfg.steps,
        cfg.lr,
        cfg.seed,
        cfg.warmup_steps,
        cfg.weight_decay,
        betas=(0.9, 0.95),
        groups=(
            ParamGroup("router.dynamic.", cfg.router_lr, cfg.weight_decay),  # a d-wide projection: decayed
            ParamGroup("router", cfg.router_lr, 0.0),
            ParamGroup("embed_tokens", cfg.lr, 0.0),
            ParamGroup(".dwa.", cfg.lr, 0.0),
        ),
        checkpoint_every=cfg.checkpoint_every,
        evaluate=evaluate,
        eval_every=cfg.eval_every,
    )
    ran = run(loop, out, f"training {architecture}", progress)
    staging = out / ".result.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging / "model")
    tokenizer.save_pretrained(staging / "model")
    tokens_per_step = cfg.batch_size * cfg.context_len
    flops = 3 * forward_flops_per_token(model.config, cfg.context_len) * tokens_per_step * cfg.steps
    last_val = next(r["val_loss"] for r in reversed(loop.history) if "val_loss" in r)
    # a step's wall time (forward, backward, update) is the gap between two step starts; the median leaves out
    # the steps that also evaluated or checkpointed
    gaps = sorted(b - a for a, b in zip(step_starts, step_starts[1:], strict=False))
    seconds_per_step = gaps[len(gaps) // 2] if gaps else None
    if (
        seconds_per_step is None and (out / "summary.json").is_file()
    ):  # a finished run, rerun: keep its timing
        seconds_per_step = atomic.read_json_object(out / "summary.json", "run summary").get(
            "seconds_per_step"
        )
    summary = {
        "architecture": architecture,
        "parameters": sum(p.numel() for p in model.parameters()),
        "cross_layer_parameters": sum(
            p.numel() for n, p in model.named_parameters() if ".router." in n or ".dwa." in n
        ),
        "steps": cfg.steps,
        "steps_run_now": ran,
        "train_tokens": tokens_per_step * cfg.steps,
        "train_flops": flops,
        "val_loss": last_val,
        "train_loss": loop.history[-1]["loss"],
        "seconds_per_step": seconds_per_step,
        "model": str(out / "model"),
    }
    atomic.write_json(staging / "history.json", loop.history)
    atomic.write_json(staging / "summary.json", summary)
    atomic.swap_in(staging, out)
    return summary


def train(
    out: Path,
    cfg: LimeTrainConfig,
    architectures: tuple[str, ...] = ("lime", "llama"),
    data: str = "stdlib:code",
    tokenizer_name: str = "zoo:code-lm",
    progress: bool = True,
) -> dict[str, Any]:
    """Train every architecture of ``architectures`` on the same contexts into ``out/<architecture>``; writes
    ``out/summary.json`` and ``out/training.html`` (loss curves) and returns the summary."""
    from interlayer.models import resolve_model_source

    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown or not architectures:
        raise UserError(f"unknown architecture {unknown!r}; choose from {', '.join(ARCHITECTURES)}")
    out = Path(out)
    source, local_only = resolve_model_source(tokenizer_name)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    train_NT = packed_contexts(tokenizer, data, "train", cfg.context_len)
    val_NT = packed_contexts(tokenizer, data, "validation", cfg.context_len, cfg.val_contexts)
    if len(train_NT) < cfg.batch_size:
        raise UserError(
            f"{data}: {len(train_NT)} training contexts, fewer than --batch-size {cfg.batch_size}"
        )
    runs = {}
    for architecture in architectures:
        folder = out / architecture
        settings = {
            "architecture": architecture,
            "config": {k: v for k, v in asdict(cfg).items() if k != "steps"},
            "data": data,
            "tokenizer": tokenizer_name,
            "version": 1,
        }
        check_settings(folder, settings, may_change=())
        runs[architecture] = train_architecture(
            architecture, cfg, tokenizer, train_NT, val_NT, folder, progress
        )
    summary = {"config": asdict(cfg), "data": data, "tokenizer": tokenizer_name, "runs": runs}
    atomic.write_json(out / "summary.json", summary)
    from interlayer.lime.report import write_training_report

    write_training_report(out, summary)
    return summary
