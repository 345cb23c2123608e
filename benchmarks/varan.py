"""VARAN vs the last layer vs SUPERB's weighted sum, with LoRA and with full fine-tuning, on both embedded tasks.

Backbone ``--model`` (default ``zoo:speech-w2v2``, the wav2vec2 encoder pretrained here on synthesised speech).
Tasks: ``synth:styles`` (4 speaking styles, classification: accuracy) and ``synth:digits`` (digit strings, CTC:
CER and WER). For every (task, mode ∈ {lora, full}, aggregation ∈ {last, weighted, varan}, seed), one
``interlayer varan train`` run with the same budget: ``--steps`` steps of ``--batch-size`` clips from the same
``--train-size`` clips, the same step-k batches for every aggregation of a seed (the batch draw depends on
(seed, k) only), the validation split scored every 250 steps and the test split at the end. ``--workers`` runs go in parallel, one
torch thread each (the fastest use of a 2-core machine for models this small). VARAN uses the
official defaults (reversed χ² prior df 2, nc 10, β 0.05, KL(prior ‖ q)), the baselines the same heads.
Mean ± std over seeds; a plot of VARAN's mean posterior over layers per task and mode.

Runs are resumable folders under ``--root`` (a rerun reuses finished ones; with more ``--steps`` it continues them,
which gives the same weights as a longer run from scratch: the learning rate is constant after warm-up).

    python benchmarks/varan.py [--steps 250] [--seeds 3] [--root /work/varanruns]
    python benchmarks/varan.py --tasks ctc --steps 500 --tag _ctc500   # the CTC runs continued to 500 steps

Writes benchmarks/results/varan{tag}.json and varan_posteriors{tag}.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TASKS = {"classification": "synth:styles", "ctc": "synth:digits"}
AGGREGATIONS = ("last", "weighted", "varan")


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _posterior_figure(posteriors: dict[str, list[float]], priors: dict[str, list[float]], tag: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for label, q in posteriors.items():
        ax.plot(range(1, len(q) + 1), q, marker="o", label=label)
    for label, p in priors.items():
        ax.plot(range(1, len(p) + 1), p, "k:", label=label)
    ax.set_xlabel("layer ℓ")
    ax.set_ylabel("mean q(ℓ | x) over the test clips")
    ax.set_title("VARAN's learned posterior over layers (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(RESULTS / f"varan_posteriors{tag}.png", dpi=120)


def _run(job: tuple[str, str, str, int, dict, str, int]) -> dict:
    """One fine-tuning run (in a worker process with ``threads`` torch threads); its row."""
    task, mode, aggregation, seed, sizes, root_model, threads = job
    import torch

    torch.set_num_threads(threads)
    from interlayer.speech.train import VaranTrainConfig
    from interlayer.speech.workflows import train_run

    root, model = root_model.split("|", 1)
    steps, batch_size = sizes.pop("steps"), sizes.pop("batch_size")
    cfg = VaranTrainConfig(
        task=task,
        aggregation=aggregation,
        mode=mode,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        eval_every=250,
        checkpoint_every=50,
    )
    start = time.perf_counter()
    summary = train_run(
        Path(root) / f"{task}-{mode}-{aggregation}-{seed}", model, TASKS[task], cfg, sizes, progress=False
    )
    test = summary["test"]
    metric = {k: test[k] for k in ("accuracy", "cer", "wer") if k in test}
    print(task, mode, aggregation, seed, metric, f"{time.perf_counter() - start:.0f}s", flush=True)
    return {
        "task": task,
        "mode": mode,
        "aggregation": aggregation,
        "seed": seed,
        **metric,
        "mean_posterior": test["mean_posterior"],
        "head_metric": test.get("head_accuracy") or test.get("head_cer"),
        "weighted_sum": summary["weighted_sum"],
        "trainable_parameters": summary["trainable_parameters"],
        "final_train_loss": summary["final_train_loss"],
        "seconds": time.perf_counter() - start,
        "config": asdict(cfg),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:speech-w2v2")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=1200)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--tasks", default="classification,ctc")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--tag", default="", help="Suffix of the result files (varan{tag}.json).")
    parser.add_argument("--workers", type=int, default=2, help="Runs in parallel, one torch thread each.")
    parser.add_argument("--root", type=Path, default=Path("/work/varanruns"))
    args = parser.parse_args()

    from interlayer.models import resolve_model_source
    from interlayer.speech.aggregation import layer_prior
    from interlayer.speech.corpus import embedded_set

    resolve_model_source(args.model)  # a zoo entry is built here once, not by every worker
    sizes = {"train": args.train_size, "validation": args.val_size, "test": args.test_size}
    for name in ("styles", "digits"):  # synthesised once, before the workers read the cache
        for split, size in sizes.items():
            embedded_set(name, split, size)
    jobs = [
        (task, mode, aggregation, seed, sizes | {"steps": args.steps, "batch_size": args.batch_size},
         f"{args.root}|{args.model}", 1 if args.workers > 1 else 2)
        for task in args.tasks.split(",")
        for mode in args.modes.split(",")
        for seed in range(args.seeds)
        for aggregation in AGGREGATIONS
    ]  # fmt: skip
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(_run, jobs))
    table = []
    posteriors = {}
    layers = 0
    for task in args.tasks.split(","):
        for mode in args.modes.split(","):
            for aggregation in AGGREGATIONS:
                group = [
                    r for r in runs if (r["task"], r["mode"], r["aggregation"]) == (task, mode, aggregation)
                ]
                row = {"task": task, "mode": mode, "aggregation": aggregation}
                for metric in ("accuracy", "cer", "wer"):
                    if metric in group[0]:
                        row[metric] = _mean_std([r[metric] for r in group])
                table.append(row)
                if aggregation == "varan":
                    qs = [r["mean_posterior"] for r in group]
                    layers = len(qs[0])
                    posteriors[f"{task} · {mode}"] = [statistics.fmean(col) for col in zip(*qs, strict=True)]
    prior = layer_prior("chi2_reversed", layers).tolist() if layers else []
    _posterior_figure(posteriors, {"prior (χ² reversed, df 2, nc 10)": prior}, args.tag)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.workers} runs in parallel",
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "sizes": sizes,
        "seeds": args.seeds,
        "table": table,
        "posteriors": posteriors,
        "prior": prior,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"varan{args.tag}.json").write_text(json.dumps(result, indent=1))
    for row in table:
        cells = [f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in row.items() if isinstance(v, dict)]
        print(row["task"], row["mode"], row["aggregation"], *cells)


if __name__ == "__main__":
    main()
