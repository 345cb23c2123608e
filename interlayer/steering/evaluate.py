"""Accuracy of a model, with or without steering vectors, on held-out problems: greedy and sampled.

- **Greedy accuracy**: the fraction of the n problems whose argmax completion
  (:func:`interlayer.arithmetic.greedy_completions`, prompts batched by equal length so no padding is
  involved) the verifier accepts (reward > 0), with its Wilson 95% interval
  (:func:`interlayer.arithmetic.wilson_interval`).
- **Sampled accuracy**: G completions per problem at temperature T (1 by default) from
  :func:`interlayer.steering.rollout.sample` with ``seed``; per problem the fraction correct c_i / G, averaged
  over problems: (1/n)·Σ_i c_i / G. Its standard error is the standard deviation of the per-problem fractions
  over √n. At small scale RL mostly sharpens sampling, so this is where training shows first.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from torch import nn

from interlayer.arithmetic import greedy_completions, wilson_interval
from interlayer.steering.rollout import sample
from interlayer.steering.tasks import TaskProblem, Verifier, is_correct, run_verifier
from interlayer.steering.vectors import SteeringVectors


@dataclass(frozen=True)
class Example:
    """One problem with the greedy completion."""

    prompt: str
    completion: str
    answer: str
    correct: bool


@dataclass(frozen=True)
class EvalResult:
    """Greedy and sampled accuracy on one set of problems."""

    problems: int
    """n, the problems evaluated."""
    correct: int
    """Problems whose greedy completion is correct."""
    accuracy: float
    """correct / n (greedy)."""
    ci_low: float
    """Lower end of the Wilson 95% interval of the greedy accuracy."""
    ci_high: float
    """Upper end of the Wilson 95% interval of the greedy accuracy."""
    sampled_accuracy: float
    """(1/n)·Σ_i c_i / G at ``temperature``; NaN when ``samples`` is 0."""
    sampled_stderr: float
    """Standard error of the sampled accuracy over problems."""
    samples: int
    """G, samples per problem."""
    temperature: float
    """Temperature of the samples."""
    seed: int
    """Seed of the samples."""
    examples: tuple[Example, ...]
    """The first few problems with their greedy completions."""


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    problems: Sequence[TaskProblem],
    verifier: Verifier,
    max_new_tokens: int,
    vectors: SteeringVectors | None = None,
    samples: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    examples: int = 5,
) -> EvalResult:
    """Greedy and sampled accuracy of ``model`` (steered by ``vectors`` when given) on ``problems``."""
    prompts = [p.prompt for p in problems]
    steering = vectors.applied(model) if vectors is not None else nullcontext()
    with steering:
        greedy = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
        rollout = (
            sample(model, tokenizer, prompts, samples, seed, max_new_tokens, temperature, batch_size)
            if samples
            else None
        )
    greedy_ok = [is_correct(run_verifier(verifier, c, p)) for c, p in zip(greedy, problems, strict=True)]
    correct = sum(greedy_ok)
    n = len(problems)
    low, high = wilson_interval(correct, n)
    sampled, stderr = math.nan, math.nan
    if rollout is not None:
        fractions = [
            sum(
                is_correct(run_verifier(verifier, rollout.completions[i * samples + j], problem))
                for j in range(samples)
            )
            / samples
            for i, problem in enumerate(problems)
        ]
        sampled = math.fsum(fractions) / n
        stderr = statistics.stdev(fractions) / math.sqrt(n) if n > 1 else math.nan
    shown = tuple(
        Example(p.prompt, c, p.answer, ok)
        for p, c, ok in list(zip(problems, greedy, greedy_ok, strict=True))[:examples]
    )
    return EvalResult(
        n, correct, correct / n if n else 0.0, low, high, sampled, stderr, samples, temperature, seed, shown
    )
