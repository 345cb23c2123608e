"""``interlayer diffusion eval``: samplers × step counts, each cell scored the same way.

A cell draws ``num_samples`` unconditional samples (seeded, so every sampler sees the same per-sample
generators) and reports the metrics of :mod:`interlayer.diffusion.metrics` (generative perplexity under a
separate causal LM, unigram entropy, n-gram diversity, Python validity), the mean NFE of the denoiser and
of the remasker per sample, wall seconds per sample, and the *overhead*: the fraction of the cell's wall
time spent outside network calls (1 − network seconds / wall seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from interlayer.diffusion.denoiser import Denoiser
from interlayer.diffusion.engine import ErrorScorer
from interlayer.diffusion.metrics import mauve_score, summarize_samples
from interlayer.diffusion.samplers import SamplerConfig, SampleResult, sample
from interlayer.diffusion.templates import build_templates, decode_samples
from interlayer.models import LoadedModel


def cell_metrics(
    result: SampleResult,
    tokenizer: Any,
    scorer: LoadedModel | None,
    with_texts: bool = False,
    mauve_references: Sequence[str] = (),
    mauve_features: str | None = None,
) -> dict[str, Any]:
    """The metrics of one set of samples (module doc); MAUVE against ``mauve_references`` when given
    (:func:`interlayer.diffusion.metrics.mauve_score`, the optional ``mauve-text`` package)."""
    texts, ids = decode_samples(tokenizer, result.tokens_NL, result.attention_NL)
    n = len(texts)
    row: dict[str, Any] = summarize_samples(texts, ids, scorer)
    if mauve_references:
        row |= mauve_score(list(mauve_references), texts, mauve_features)
    row |= {
        "nfe": float(result.nfe_N.float().mean()),
        "remasker_nfe": float(result.remasker_nfe_N.float().mean()),
        "seconds_per_sample": result.seconds / n,
        "overhead": 1.0 - result.network_seconds / result.seconds if result.seconds > 0 else 0.0,
    }
    if with_texts:
        row["texts"] = texts
    return row


def evaluate_grid(
    denoiser: Denoiser,
    tokenizer: Any,
    configs: Sequence[SamplerConfig],
    steps: Sequence[int],
    num_samples: int,
    length: int,
    scorer: LoadedModel | None = None,
    remasker: ErrorScorer | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    mauve_references: Sequence[str] = (),
    mauve_features: str | None = None,
) -> list[dict[str, Any]]:
    """One row per (sampler config, steps): its settings and :func:`cell_metrics`."""
    template, attention = build_templates(tokenizer, denoiser.mask_id, num_samples, length)
    rows = []
    for config in configs:
        for n in steps:
            cell = replace(config, steps=n)
            result = sample(denoiser, cell, template, attention, seed, batch_size, remasker, progress)
            metrics = cell_metrics(result, tokenizer, scorer, False, mauve_references, mauve_features)
            rows.append({"sampler": cell.label(), "steps": n, **metrics})
    return rows
