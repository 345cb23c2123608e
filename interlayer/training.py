"""The resumable training loop shared by ``diffusion train`` (the MDLM denoiser), ``train-remasker`` and
``lime train``.

Step k's batch and every random draw of it come from a generator seeded by (seed, k) alone (and the
global stream, which dropout reads, is seeded from (seed, k) for the step), so a run
killed at any point and rerun with the same command continues from its last checkpoint and ends with the
same weights as an uninterrupted run (bit for bit on the same device with the same thread count).
A checkpoint (every ``checkpoint_every`` steps and at the end) is the trainable parameters and AdamW's
state in one safetensors file, committed by atomically replacing ``checkpoint/state.json``; the previous
checkpoint is deleted only after that. Parameters whose name contains a :class:`ParamGroup`'s text train with
that group's learning rate and weight decay (LIMe's routers: lr 1e-2, no decay). A rerun of a folder holding a run with other settings is refused;
``steps`` may grow (the learning-rate schedule is a constant after warm-up, so growing it changes nothing
already done).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interlayer import atomic
from interlayer.errors import UserError
from interlayer.progress import progress_bar

CHECKPOINT = "checkpoint"


def row_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` (a training step, a sample) of a run seeded ``seed``: 63 bits of
    sha256("seed:index"), so that item k's randomness depends on (seed, k) alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


def draw_batch(contexts_NT: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` contexts drawn without replacement (by the step's generator)."""
    return contexts_NT[torch.randperm(len(contexts_NT), generator=generator)[:batch_size]]


@dataclass(frozen=True)
class ParamGroup:
    """Parameters whose name contains ``name_contains`` train with their own learning rate and weight decay."""

    name_contains: str
    """A substring of the parameter's name (``router``)."""
    lr: float
    """Peak learning rate of the group (warm-up scales it like the base rate)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay of the group."""
    decay_vectors: bool = True
    """False: the group's vectors and scalars (biases, norms) are not decayed, only its matrices."""


@dataclass
class TrainingLoop:
    """What a run trains and how: ``step_fn(k, generator)`` returns the loss to minimise and numbers to log."""

    module: nn.Module
    step_fn: Callable[[int, torch.Generator], tuple[torch.Tensor, dict[str, float]]]
    steps: int
    lr: float
    seed: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    groups: tuple[ParamGroup, ...] = ()
    """Parameters with their own learning rate (the first group whose text a name contains wins)."""
    checkpoint_every: int = 100
    evaluate: Callable[[int], dict[str, float]] | None = None
    """Called every ``eval_every`` steps and at the end; its numbers join the history."""
    eval_every: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}


def check_settings(out: Path, settings: dict[str, Any], may_change: tuple[str, ...]) -> None:
    """Refuse ``out`` when it holds a run whose settings differ outside ``may_change``; record them otherwise."""
    path = out / "settings.json"
    # a folder without a checkpoint holds no run yet (a first attempt that failed early): nothing to protect
    if path.is_file() and (out / CHECKPOINT / "state.json").is_file():
        stored = atomic.read_json_object(path, "run settings")
        for key in sorted(set(stored) | set(settings)):
            if key not in may_change and stored.get(key) != settings.get(key):
                raise UserError(
                    f"{out} holds a run with {key}={stored.get(key)!r}, not {settings.get(key)!r}; "
                    "use another --out or delete that folder"
                )
    atomic.write_json(path, settings)


def _write_checkpoint(out: Path, loop: TrainingLoop, optimizer: torch.optim.Optimizer, step: int) -> None:
    folder = out / CHECKPOINT
    params = loop.trainable()
    tensors = {f"param.{name}": p.detach() for name, p in params.items()}
    names = {id(p): name for name, p in params.items()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"adam.{names[id(param)]}.{key}"] = torch.as_tensor(value).detach().cpu()
    file = f"state-{step}.safetensors"
    atomic.write_tensors(folder / file, tensors)
    atomic.write_json(folder / "state.json", {"step": step, "file": file, "history": loop.history})
    for path in folder.glob("state-*.safetensors"):
        if path.name != file:
            path.unlink(missing_ok=True)


def _resume(out: Path, loop: TrainingLoop, optimizer: torch.optim.Optimizer) -> int:
    state_path = out / CHECKPOINT / "state.json"
    if not state_path.is_file():
        return 0
    state = atomic.read_json_object(state_path, "checkpoint state")
    tensors = atomic.read_tensors(out / CHECKPOINT / str(state["file"]), "checkpoint")
    params = loop.trainable()
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"param.{name}"])
    for name, value in tensors.items():
        if name.startswith("adam."):
            param_name, key = name[len("adam.") :].rsplit(".", 1)
            param = params[param_name]
            optimizer.state[param][key] = value.to(param.device) if key != "step" else value.clone()
    loop.history[:] = list(state["history"])
    return int(state["step"])


def _param_groups(loop: TrainingLoop, params: dict[str, nn.Parameter]) -> list[dict[str, Any]]:
    """AdamW's groups: each :class:`ParamGroup`, then the other matrices (decayed) and vectors (not)."""
    special: list[list[nn.Parameter]] = [[] for _ in loop.groups]
    special_vectors: list[list[nn.Parameter]] = [[] for _ in loop.groups]
    matrices: list[nn.Parameter] = []
    vectors: list[nn.Parameter] = []
    for name, param in params.items():
        index = next((i for i, g in enumerate(loop.groups) if g.name_contains in name), None)
        if index is not None:
            vector = param.ndim < 2 and not loop.groups[index].decay_vectors
            (special_vectors if vector else special)[index].append(param)
        else:
            (matrices if param.ndim >= 2 else vectors).append(param)
    groups = [
        {"params": ps, "peak_lr": g.lr, "weight_decay": g.weight_decay}
        for g, ps in zip(loop.groups, special, strict=True)
    ]
    groups += [
        {"params": ps, "peak_lr": g.lr, "weight_decay": 0.0}
        for g, ps in zip(loop.groups, special_vectors, strict=True)
    ]
    groups += [
        {"params": matrices, "peak_lr": loop.lr, "weight_decay": loop.weight_decay},
        {"params": vectors, "peak_lr": loop.lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def run(loop: TrainingLoop, out: Path, description: str, progress: bool = True) -> int:
    """Train from the last checkpoint in ``out`` (if any) to ``loop.steps``; returns the steps taken now.

    AdamW (β = ``loop.betas``, decoupled weight decay on matrices only, :attr:`TrainingLoop.groups` apart),
    every group's learning rate rising linearly over ``warmup_steps`` then constant, the gradient norm (over
    all parameters) clipped at ``grad_clip``."""
    params = loop.trainable()
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(_param_groups(loop, params), lr=loop.lr, betas=loop.betas)
    start = _resume(out, loop, optimizer)
    if start > loop.steps:
        raise UserError(
            f"{out} holds a run already at step {start}, past --steps {loop.steps}; use more steps"
        )
    loop.module.train()
    with progress_bar(description, loop.steps, visible=progress) as bar:
        bar.show(start)
        for step in range(start + 1, loop.steps + 1):
            warm = min(1.0, step / loop.warmup_steps) if loop.warmup_steps else 1.0
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * warm
            generator = torch.Generator().manual_seed(row_seed(loop.seed, step))
            with torch.random.fork_rng(
                devices=[]
            ):  # dropout draws from the global stream: seed it per step too
                torch.manual_seed(row_seed(loop.seed + 1, step))
                loss, logged = loop.step_fn(step, generator)
            if not math.isfinite(loss.item()):
                raise UserError(f"the loss became {loss.item()} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), loop.grad_clip)
            optimizer.step()
            record: dict[str, Any] = {
                "step": step,
                "loss": loss.item(),
                "grad_norm": float(grad_norm),
                **logged,
            }
            if loop.evaluate and (step == loop.steps or (loop.eval_every and step % loop.eval_every == 0)):
                loop.module.eval()
                record |= {f"val_{k}": v for k, v in loop.evaluate(step).items()}
                loop.module.train()
            loop.history.append(record)
            bar.show(step, f"loss {loss.item():.3f}")
            if step % loop.checkpoint_every == 0 or step == loop.steps:
                _write_checkpoint(out, loop, optimizer, step)
    loop.module.eval()
    return loop.steps - start
