"""``interlayer steer analyze`` as a library call: every analysis of :mod:`interlayer.steering.analysis` on the
steered model's own completions, transfer to a second model, ``report.html`` and ``analysis.json``.

The data: ``problems`` held-out problems of the task; for each, the greedy completion of the steered model
(all vectors on). A row is ``[BOS] + tokens(prompt) + tokens(completion)`` (prompt and completion encoded
apart, so the completion starts at a known index), right-padded. Persistence and path patching run on these
rows; token substitution teacher-forces them with and without the last layer's vector. Path patching runs when
the vectors include the penultimate layer ``layers.{L-2}`` (so not on a one-layer model).

Transfer: greedy and sampled accuracy (:func:`interlayer.steering.evaluate.evaluate`) of the source model and
of a second model of the same width and depth (another checkpoint of the family: a base model and its
fine-tuned version, two seeds), each without and with the vectors; the gain a vector gives on the second
model is how well it transfers.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interlayer import atomic
from interlayer.arithmetic import greedy_completions
from interlayer.errors import UserError
from interlayer.report.html import Section, metrics_table, write_report
from interlayer.steering.analysis import logit_lens, path_patching, persistence, token_substitution
from interlayer.steering.analysis_report import analysis_sections
from interlayer.steering.evaluate import EvalResult, evaluate
from interlayer.steering.rollout import encode_prompts, pad_id
from interlayer.steering.tasks import Task, TaskProblem
from interlayer.steering.vectors import SteeringVectors


def completion_rows(
    tokenizer: Any, prompts: list[str], completions: list[str]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(input_ids [B, T], attention_mask [B, T], completion_start) of the rows described in the module
    docstring; a completion that encodes to no token gets the EOS (or pad) token, so every row has one."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    fill = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_id(tokenizer)
    completion_ids = [ids or [fill] for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    ids_BT = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids_BT[b, : len(row)] = torch.tensor(row)
        mask_BT[b, : len(row)] = 1
    return ids_BT, mask_BT, [len(p) for p in prompt_ids]


def _transfer_rows(name: str, plain: EvalResult, steered: EvalResult) -> dict[str, Any]:
    return {
        "model": name,
        "greedy without": plain.accuracy,
        "greedy with": steered.accuracy,
        "greedy gain": steered.accuracy - plain.accuracy,
        "sampled without": plain.sampled_accuracy,
        "sampled with": steered.sampled_accuracy,
        "sampled gain": steered.sampled_accuracy - plain.sampled_accuracy,
    }


def transfer(
    models: dict[str, tuple[nn.Module, Any]],
    vectors: SteeringVectors,
    problems: list[TaskProblem],
    task: Task,
    samples: int = 4,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per model (name → (model, tokenizer)): greedy and sampled accuracy without and with the
    vectors, and the gains."""
    rows = []
    for name, (model, tokenizer) in models.items():
        vectors.check_model(model)
        plain, steered = (
            evaluate(model, tokenizer, problems, task.verifier, task.max_new_tokens, v, samples, seed=seed)
            for v in (None, vectors)
        )
        rows.append(_transfer_rows(name, plain, steered))
    return rows


def analyze(
    model: nn.Module,
    tokenizer: Any,
    vectors: SteeringVectors,
    task: Task,
    problems: int = 64,
    model_name: str = "",
    transfer_models: dict[str, tuple[nn.Module, Any]] | None = None,
    transfer_problems: int = 200,
) -> tuple[list[Section], dict[str, Any]]:
    """Every analysis on one batch of ``problems`` held-out rows (the test split, else validation): the report
    sections and the JSON-ready results."""
    vectors.check_model(model)
    pool = task.problems.get("test") or task.problems.get("validation") or []
    held_out = pool[:problems]
    if not held_out:
        raise UserError(f"task {task.name} has no test or validation problems to analyse on")
    prompts = [p.prompt for p in held_out]
    with vectors.applied(model):
        completions = greedy_completions(model, tokenizer, prompts, task.max_new_tokens)
    ids_BT, mask_BT, starts = completion_rows(tokenizer, prompts, completions)
    lens = logit_lens(model, tokenizer, vectors)
    persistence_curves = persistence(model, vectors, ids_BT, mask_BT)
    substitution = token_substitution(model, tokenizer, vectors, ids_BT, mask_BT, starts)
    # path patching needs a penultimate layer's vector and a block after it
    depth = vectors.meta.num_layers
    patchable = depth >= 2 and f"layers.{depth - 2}" in vectors.meta.sites
    patching = path_patching(model, vectors, ids_BT, mask_BT) if patchable else None
    sections = analysis_sections(lens, persistence_curves, substitution, patching)
    transfer_rows: list[dict[str, Any]] = []
    if transfer_models:
        source = {model_name or "source": (model, tokenizer)}
        transfer_rows = transfer(source | transfer_models, vectors, pool[:transfer_problems], task)
        sections.append(
            Section(
                "Transfer",
                f"<p>Greedy and sampled accuracy (4 samples at T = 1) of each model without and with these "
                f"vectors, on the same {min(transfer_problems, len(pool))} held-out problems: a gain on another "
                "model means the vectors transfer.</p>" + metrics_table(transfer_rows),
            )
        )
    results = {
        "model": model_name,
        "problems": len(held_out),
        "logit_lens": [asdict(x) for x in lens],
        "persistence": [asdict(x) for x in persistence_curves],
        "token_substitution": {k: v for k, v in asdict(substitution).items() if k != "per_position"},
        "path_patching": asdict(patching) if patching is not None else None,
        "transfer": transfer_rows,
        "examples": [
            {"prompt": p, "completion": c} for p, c in list(zip(prompts, completions, strict=True))[:5]
        ],
    }
    return sections, results


def run_analysis(
    model: nn.Module,
    tokenizer: Any,
    vectors: SteeringVectors,
    task: Task,
    out: str | Path,
    problems: int = 64,
    model_name: str = "",
    transfer_models: dict[str, tuple[nn.Module, Any]] | None = None,
    transfer_problems: int = 200,
) -> dict[str, Any]:
    """:func:`analyze`, written to ``out/analysis.json`` and ``out/report.html``; returns where they are."""
    out = Path(out)
    sections, results = analyze(
        model, tokenizer, vectors, task, problems, model_name, transfer_models, transfer_problems
    )
    atomic.write_json(out / "analysis.json", results)
    report = write_report(
        out / "report.html",
        "What the steering vectors do",
        sections,
        subtitle=f"{model_name} · {len(vectors.meta.sites)} vector(s) · {results['problems']} problems",
    )
    return {"report": str(report), "analysis": str(out / "analysis.json"), "problems": results["problems"]}
