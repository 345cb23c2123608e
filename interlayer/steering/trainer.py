"""The RL loop: sample G completions per prompt, score them with a verifier, take one policy-gradient step.

Step k (1-based) of a run with seed s:

1. draws ``prompts_per_step`` training problems with ``random.Random(f"rl:{s}:{k}").sample`` (without
   replacement within the step);
2. samples ``samples_per_prompt`` completions of each at ``temperature`` with the policy on
   (:func:`interlayer.steering.rollout.sample`, seed ``s·1000003 + k``);
3. scores each with the task's verifier (``True`` → +1, ``False`` → −1, a number as is), computes the
   advantages (:func:`interlayer.steering.objectives.advantages`, RLOO or GRPO without std);
4. takes one gradient step of Adam (β = (0.9, 0.999), no weight decay) on the loss of
   :func:`interlayer.steering.objectives.policy_loss`, accumulated over micro-batches of ``micro_batch``
   completions, after clipping the gradient norm at ``max_grad_norm`` (0: no clipping).

Because each step's problems and samples depend only on (seed, step), a run resumed from a checkpoint
repeats exactly what the uninterrupted run would have done: the same vectors bit for bit on the same device
with the same thread count (``torch.get_num_threads()``; float reductions are ordered by it), up to float
rounding otherwise. Checkpoints are taken every ``checkpoint_every`` steps into ``checkpoint/``: one
safetensors file with the trainable parameters and Adam's state, then ``state.json`` (step and history), whose
atomic rename is the commit; a kill loses at most ``checkpoint_every`` steps. The run folder holds
``settings.json`` (a rerun with other settings, dtype or number of training problems is refused; ``--steps``
may grow to continue a finished run, and ``micro_batch`` may change, which changes float rounding only),
``history.json`` (one record per step), the result (``vectors/``, ``adapter/`` + ``model/`` or ``model/``,
see :class:`interlayer.steering.policy.Policy`) and ``summary.json``, written last.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interlayer import atomic
from interlayer.errors import UserError
from interlayer.progress import progress_bar
from interlayer.steering.evaluate import evaluate
from interlayer.steering.objectives import ALGORITHMS, advantages, kl_k3, policy_loss
from interlayer.steering.policy import DEFAULT_LR, MODES, Policy
from interlayer.steering.rollout import Rollout, completion_logprobs, sample
from interlayer.steering.tasks import Task, TaskProblem, is_correct, run_verifier

CHECKPOINT = "checkpoint"
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "micro_batch", "eval_every", "eval_problems")
"""Settings a rerun may change without the run folder being refused."""


@dataclass(frozen=True)
class RLConfig:
    """Settings of one RL run (the paper's values by default, arXiv:2505.18706)."""

    mode: str = "vectors"
    """What is trained: ``vectors`` (one per site), ``single``, ``lowrank``, ``full`` or ``lora``."""
    sites: str = ""
    """Sites of the vectors (names or globs); default ``layers.*`` (``single``: the middle layer)."""
    rank: int = 2
    """r of the ``lowrank`` mode's S = A·B."""
    lora_rank: int = 4
    """r of the ``lora`` mode."""
    algorithm: str = "rloo"
    """``rloo`` (leave-one-out baseline) or ``grpo`` (group mean, no std normalisation)."""
    kl_coef: float = 0.0
    """β of the k3 KL penalty to the frozen model (0: none, and no reference pass)."""
    lr: float = 0.0
    """Adam's learning rate; 0 takes the paper's value for the mode (vectors 1e-3, full 1e-6, LoRA 1e-4)."""
    steps: int = 100
    """RL updates (one per rollout batch)."""
    prompts_per_step: int = 16
    """Prompts per rollout batch."""
    samples_per_prompt: int = 16
    """G, completions sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    max_new_tokens: int = 0
    """Completion length limit; 0 takes the task's."""
    max_grad_norm: float = 1.0
    """Gradient norm clip (0: none)."""
    micro_batch: int = 64
    """Completions per forward/backward pass (memory only; the step is the same)."""
    generation_batch: int = 256
    """Rows per ``generate`` call."""
    seed: int = 0
    """Seeds the problems drawn, the samples and the low-rank/LoRA initialisation."""
    checkpoint_every: int = 10
    """Steps between checkpoints."""
    eval_every: int = 0
    """Greedy accuracy on ``eval_problems`` validation problems every this many steps (0: never)."""
    eval_problems: int = 100
    """Validation problems of that periodic check."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.samples_per_prompt < 2:
            raise UserError(f"samples_per_prompt must be at least 2, got {self.samples_per_prompt}")
        for name in ("steps", "prompts_per_step", "micro_batch", "generation_batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "kl_coef", "max_grad_norm", "temperature", "eval_every", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature == 0:
            raise UserError("temperature must be > 0 for RL sampling")
        for name in ("rank", "lora_rank"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the mode's default when 0."""
        return self.lr or DEFAULT_LR[self.mode]


def step_problems(problems: list[TaskProblem], seed: int, step: int, count: int) -> list[TaskProblem]:
    """The problems of step ``step`` (see the module docstring)."""
    if count > len(problems):
        raise UserError(f"prompts_per_step {count} is more than the {len(problems)} training problems")
    return [problems[i] for i in random.Random(f"rl:{seed}:{step}").sample(range(len(problems)), count)]


def rewards_of(task: Task, rollout: Rollout, problems: list[TaskProblem], samples: int) -> torch.Tensor:
    """Rewards [P, G] of a rollout ordered prompt-major."""
    values = [
        run_verifier(task.verifier, completion, problems[row // samples])
        for row, completion in enumerate(rollout.completions)
    ]
    return torch.tensor(values, dtype=torch.float32).view(len(problems), samples)


def _optimizer(policy: Policy, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(policy.parameters(), lr=lr, betas=(0.9, 0.999))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimiser's state tensors (Adam: two moments per parameter, plus step counters)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def _gradient_step(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    advantages_N: torch.Tensor,
    cfg: RLConfig,
) -> dict[str, float]:
    """Accumulate the loss's gradient over micro-batches, clip, step; returns loss, KL and gradient norm."""
    mask_NC = rollout.completion_mask_NC
    tokens = max(float(mask_NC.sum()), 1.0)
    device = next(policy.model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    loss_total, kl_total = 0.0, 0.0
    for lo in range(0, len(advantages_N), cfg.micro_batch):
        rows = slice(lo, lo + cfg.micro_batch)
        part = rollout.rows(rows)
        reference_NC = None
        if cfg.kl_coef:
            with torch.no_grad(), policy.reference() as reference_model:
                reference_NC = completion_logprobs(reference_model, part, cfg.temperature)
        with policy.policy():
            logp_NC = completion_logprobs(policy.model, part, cfg.temperature)
        part_mask = mask_NC[rows].to(device)
        loss = policy_loss(
            logp_NC, advantages_N[rows].to(device), part_mask, reference_NC, cfg.kl_coef, tokens=tokens
        )
        loss.backward()  # type: ignore[no-untyped-call]
        loss_total += float(loss.detach())
        if reference_NC is not None:
            kl_total += float((kl_k3(logp_NC.detach(), reference_NC) * part_mask).sum()) / tokens
    # an infinite bound clips nothing and still returns the total norm
    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or math.inf))
    optimizer.step()
    return {"loss": loss_total, "kl": kl_total, "grad_norm": grad_norm}


def _settings(cfg: RLConfig, model_name: str, task: Task, dtype: str) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the folder: the config, the model and its dtype,
    the task and its number of training problems (each step samples from that range)."""
    return {
        "config": asdict(cfg),
        "model": model_name,
        "dtype": dtype,
        "task": task.name,
        "train_problems": len(task.problems.get("train", [])),
        "version": 1,
    }


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse ``out`` when it holds a run with other settings (those of :data:`_RESUMABLE_CHANGES` may differ)."""
    path = out / "settings.json"
    if not path.is_file():
        return
    stored = atomic.read_json_object(path, "run settings")
    stored_cfg = {k: v for k, v in stored.get("config", {}).items() if k not in _RESUMABLE_CHANGES}
    new_cfg = {k: v for k, v in settings["config"].items() if k not in _RESUMABLE_CHANGES}
    for key in sorted(set(stored_cfg) | set(new_cfg)):
        if stored_cfg.get(key) != new_cfg.get(key):
            raise UserError(
                f"{out} holds a run with {key}={stored_cfg.get(key)!r}, not {new_cfg.get(key)!r}; "
                "use another --out or delete that folder"
            )
    for key in ("model", "dtype", "task", "train_problems"):
        if stored.get(key) != settings[key]:
            raise UserError(
                f"{out} holds a run of {key} {stored.get(key)!r}, not {settings[key]!r}; use another --out"
            )


def _write_checkpoint(
    out: Path, step: int, policy: Policy, optimizer: torch.optim.Optimizer, history: list[dict[str, Any]]
) -> None:
    folder = out / CHECKPOINT
    tensors = {f"param.{name}": t for name, t in policy.state_tensors().items()}
    names = {id(p): name for name, p in policy.named_parameters()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"adam.{names[id(param)]}.{key}"] = torch.as_tensor(value).detach().cpu()
    file = f"state-{step}.safetensors"
    atomic.write_tensors(folder / file, tensors)
    atomic.write_json(folder / "state.json", {"step": step, "file": file, "history": history})
    for path in folder.glob("state-*.safetensors"):
        if path.name != file:
            path.unlink(missing_ok=True)


def _resume(out: Path, policy: Policy, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]]]:
    state_path = out / CHECKPOINT / "state.json"
    if not state_path.is_file():
        return 0, []
    state = atomic.read_json_object(state_path, "checkpoint state")
    tensors = atomic.read_tensors(out / CHECKPOINT / str(state["file"]), "checkpoint")
    policy.load_state_tensors({k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")})
    params = dict(policy.named_parameters())
    for name, value in tensors.items():
        if name.startswith("adam."):
            param_name, key = name[len("adam.") :].rsplit(".", 1)
            param = params[param_name]
            optimizer.state[param][key] = value.to(param.device) if key != "step" else value.clone()
    return int(state["step"]), list(state["history"])


def _save_result(policy: Policy, out: Path, tokenizer: Any) -> str:
    """Write the result into a temporary folder and swap it in, so a crash never leaves a half-written one."""
    staging = out / ".result.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    written = policy.save_result(staging, tokenizer)
    atomic.swap_in(staging, out)
    return written.name


def train_rl(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    cfg: RLConfig,
    out: str | Path,
    model_name: str = "",
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg.mode`` on ``task`` for ``cfg.steps`` RL updates into ``out`` (resuming from its checkpoint);
    returns the summary also written to ``out/summary.json``. ``model`` must be frozen (as
    :func:`interlayer.models.load_model` returns it); full fine-tuning and LoRA modify it in place."""
    out = Path(out)
    train = task.problems.get("train", [])
    if not train:
        raise UserError(f"task {task.name} has no training problems")
    max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
    dtype = next(model.parameters()).dtype
    if cfg.mode == "full" and dtype != torch.float32:
        raise UserError(
            f"full fine-tuning needs float32 weights (in {dtype} Adam's small updates round away); use --dtype float32"
        )
    step_problems(
        train, cfg.seed, 1, cfg.prompts_per_step
    )  # a bad --prompts fails before the folder is claimed
    settings = _settings(cfg, model_name, task, str(dtype).removeprefix("torch."))
    _check_settings(out, settings)
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = atomic.read_json_object(summary_path, "run summary")
        if summary.get("steps") == cfg.steps:
            return summary
    model.eval()
    policy = Policy(
        model, cfg.mode, cfg.sites, cfg.rank, cfg.lora_rank, cfg.kl_coef > 0, model_name, cfg.seed
    )
    atomic.write_json(out / "settings.json", settings)  # only once the policy could be built
    optimizer = _optimizer(policy, cfg.learning_rate)
    start, history = _resume(out, policy, optimizer)
    if start > cfg.steps:
        raise UserError(f"{out} already holds {start} steps, more than --steps {cfg.steps}")
    validation = task.problems.get("validation", [])[: cfg.eval_problems]
    with progress_bar(f"RL {cfg.mode}", cfg.steps, visible=progress) as bar:
        bar.show(start)
        for step in range(start + 1, cfg.steps + 1):
            began = time.perf_counter()
            problems = step_problems(train, cfg.seed, step, cfg.prompts_per_step)
            with policy.policy():
                rollout = sample(
                    policy.model,
                    tokenizer,
                    [p.prompt for p in problems],
                    cfg.samples_per_prompt,
                    cfg.seed * 1_000_003 + step,
                    max_new_tokens,
                    cfg.temperature,
                    cfg.generation_batch,
                )
            rewards_PG = rewards_of(task, rollout, problems, cfg.samples_per_prompt)
            advantages_N = advantages(rewards_PG, cfg.algorithm).flatten()
            stats = _gradient_step(policy, optimizer, rollout, advantages_N, cfg)
            record: dict[str, Any] = {
                "step": step,
                "reward": float(rewards_PG.mean()),
                "accuracy": sum(is_correct(float(r)) for r in rewards_PG.flatten()) / rewards_PG.numel(),
                "completion_tokens": float(rollout.completion_mask_NC.sum(1).float().mean()),
                **stats,
                "seconds": time.perf_counter() - began,
            }
            if cfg.eval_every and validation and (step % cfg.eval_every == 0 or step == cfg.steps):
                record["validation_greedy_accuracy"] = greedy_accuracy(
                    policy, tokenizer, task, validation, max_new_tokens
                )
            history.append(record)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _write_checkpoint(out, step, policy, optimizer, history)
            bar.show(step, f"reward {record['reward']:+.2f} acc {record['accuracy']:.2f}")
            if on_step is not None:
                on_step(step, record)
    atomic.write_json(out / "history.json", history)
    result = _save_result(policy, out, tokenizer)
    recent = history[-min(10, len(history)) :]
    summary = {
        "mode": cfg.mode,
        "algorithm": cfg.algorithm,
        "lr": cfg.learning_rate,
        "steps": cfg.steps,
        "trainable_parameters": policy.num_parameters(),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "seconds_per_step": math.fsum(r["seconds"] for r in history) / max(len(history), 1),
        "final_train_accuracy": math.fsum(r["accuracy"] for r in recent) / max(len(recent), 1),
        "result": str(out / result),
        "out": str(out),
    }
    atomic.write_json(summary_path, summary)
    return summary


def greedy_accuracy(
    policy: Policy, tokenizer: Any, task: Task, problems: list[TaskProblem], max_new_tokens: int
) -> float:
    """The fraction of ``problems`` whose greedy completion (policy on) the verifier accepts."""
    with policy.policy():
        return evaluate(policy.model, tokenizer, problems, task.verifier, max_new_tokens, samples=0).accuracy
