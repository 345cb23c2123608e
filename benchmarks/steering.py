"""The RL steering paper's table at small scale (arXiv:2505.18706 on zoo:arith-lm): base, full RL fine-tuning,
all-layer steering vectors, one single-layer vector and LoRA (r = 4 on the MLP down projections), the same RL
budget for each, a learning rate tuned per mode on validation problems, several seeds.

Phases (every run folder is resumable: rerunning the script continues where it stopped):

1. the base model on the test and validation problems;
2. tuning: each mode at each learning rate of its grid for ``--tune-steps`` steps (seed 0), scored by the
   sampled accuracy on ``--val-problems`` validation problems; the best rate per mode is kept;
3. finals: each mode at its rate for ``--steps`` steps and each of ``--seeds``, then greedy and sampled
   accuracy on ``--test-problems`` test problems (``interlayer.steering.evaluate``).

Jobs run ``--jobs`` at a time in separate processes with ``2 // jobs`` threads each (one thread per run with
two jobs; the runs are bit-identical on resume at that thread count).

    python benchmarks/steering.py [--root /work/steerruns] [--jobs 2]

Writes benchmarks/results/steering.json, benchmarks/results/steering_curves.png and prints the table of
BENCHMARKS.md ("recovered" = (mode − base) / (full − base) of the seed means).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

MODEL = "zoo:arith-lm"
GRIDS = {
    "full": (3e-6, 1e-5, 3e-5, 1e-4),
    "vectors": (3e-3, 1e-2, 3e-2, 1e-1),
    "single": (3e-3, 1e-2, 3e-2, 1e-1),
    "lora": (1e-4, 3e-4, 1e-3, 3e-3),
}
RESULTS = Path(__file__).parent / "results"


def _init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _evaluate(
    folder: Path, split: str, problems: int, samples: int, seed: int, name: str, steps: int
) -> dict[str, Any]:
    """Greedy and sampled accuracy of the run in ``folder`` after ``steps`` steps (or the base model when it
    holds no result), cached under a name with every figure that changes it."""
    from interlayer.models import load_model
    from interlayer.steering.evaluate import evaluate
    from interlayer.steering.tasks import load_task
    from interlayer.steering.vectors import SteeringVectors

    cached = folder / f"eval-{split}-{problems}-{samples}-steps{steps}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    task = load_task(
        "arith",
        train=0,
        validation=problems if split == "validation" else 0,
        test=problems if split == "test" else 0,
        seed=1000,  # held-out problems drawn apart from the runs' seeds
    )
    model_path = folder / "model"
    lm = load_model(str(model_path) if model_path.is_dir() else MODEL)
    vectors = SteeringVectors.load(folder / "vectors", lm.model) if (folder / "vectors").is_dir() else None
    start = time.perf_counter()
    result = evaluate(
        lm.model,
        lm.tokenizer,
        task.problems[split],
        task.verifier,
        task.max_new_tokens,
        vectors,
        samples,
        seed=seed,
    )
    out = {k: v for k, v in asdict(result).items() if k != "examples"}
    out |= {"seconds": time.perf_counter() - start, "name": name}
    folder.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(out, indent=1))
    return out


def _job(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one run (resumable) and evaluate it."""
    from interlayer.models import load_model
    from interlayer.steering.tasks import load_task
    from interlayer.steering.trainer import RLConfig, train_rl

    folder = Path(spec["folder"])
    summary: dict[str, Any] = {}
    if spec["mode"] != "base":
        lm = load_model(MODEL)
        task = load_task(
            "arith",
            train=spec["train_problems"],
            validation=spec["curve_problems"],
            test=0,
            seed=spec["seed"],
        )
        cfg = RLConfig(
            mode=spec["mode"],
            lr=spec["lr"],
            steps=spec["steps"],
            prompts_per_step=spec["prompts"],
            samples_per_prompt=spec["samples"],
            seed=spec["seed"],
            checkpoint_every=10,
            eval_every=spec["eval_every"],
            eval_problems=spec["curve_problems"],
        )
        summary = train_rl(lm.model, lm.tokenizer, task, cfg, folder, model_name=MODEL, progress=False)
    evaluation = _evaluate(
        folder, spec["split"], spec["problems"], spec["eval_samples"], 0, spec["name"], spec.get("steps", 0)
    )
    return {"spec": spec, "summary": summary, "eval": evaluation}


def _run_all(specs: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    threads = max(1, (os.cpu_count() or 2) // jobs)
    with ProcessPoolExecutor(
        jobs, mp_context=get_context("spawn"), initializer=_init, initargs=(threads,)
    ) as pool:
        results = []
        for result in pool.map(_job, specs):
            spec, ev = result["spec"], result["eval"]
            print(
                f"  {spec['name']}: greedy {ev['accuracy']:.3f} sampled {ev['sampled_accuracy']:.3f}",
                flush=True,
            )
            results.append(result)
        return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _plot(curves: dict[str, list[list[dict[str, Any]]]], base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, histories in curves.items():
        steps = [r["step"] for r in histories[0]]
        window = 10
        means = [statistics.fmean(h[i]["accuracy"] for h in histories) for i in range(len(steps))]
        smooth = [statistics.fmean(means[max(0, i - window + 1) : i + 1]) for i in range(len(means))]
        ax_train.plot(steps, smooth, label=mode)
        val = [
            (r["step"], r["validation_greedy_accuracy"])
            for r in histories[0]
            if "validation_greedy_accuracy" in r
        ]
        if val:
            val_means = [
                statistics.fmean(
                    next(r["validation_greedy_accuracy"] for r in h if r["step"] == s) for h in histories
                )
                for s, _ in val
            ]
            ax_val.plot([s for s, _ in val], val_means, marker="o", label=mode)
    ax_train.set(xlabel="RL step", ylabel="sampled accuracy on the step's prompts (T = 1)", title="training")
    ax_val.axhline(base, color="grey", linestyle="--", label="base")
    ax_val.set(xlabel="RL step", ylabel="greedy accuracy, validation", title="validation")
    for ax in (ax_train, ax_val):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("/work/steerruns"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tune-steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default="full,vectors,single,lora")
    parser.add_argument("--train-problems", type=int, default=5000)
    parser.add_argument("--val-problems", type=int, default=200)
    parser.add_argument("--test-problems", type=int, default=500)
    parser.add_argument("--curve-problems", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=4)
    args = parser.parse_args()
    modes = args.modes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    common = {
        "prompts": args.prompts,
        "samples": args.samples,
        "train_problems": args.train_problems,
        "eval_samples": args.eval_samples,
    }
    started = time.time()

    print("phase 1: base", flush=True)
    base_specs = [
        {
            "mode": "base",
            "folder": str(args.root / "base"),
            "split": split,
            "problems": n,
            "name": f"base {split}",
        }
        | common
        for split, n in (("test", args.test_problems), ("validation", args.val_problems))
    ]
    base_test, base_val = (r["eval"] for r in _run_all(base_specs, args.jobs))

    print("phase 2: learning rates on validation", flush=True)
    tune_specs = [
        {
            "mode": mode,
            "lr": lr,
            "seed": 0,
            "steps": args.tune_steps,
            "eval_every": 0,
            "curve_problems": 0,
            "folder": str(args.root / "tune" / f"{mode}-{lr:g}"),
            "split": "validation",
            "problems": args.val_problems,
            "name": f"tune {mode} lr {lr:g}",
        }
        | common
        for mode in modes
        for lr in GRIDS[mode]
    ]
    tuned = _run_all(tune_specs, args.jobs)
    best: dict[str, float] = {}
    for mode in modes:
        rows = [r for r in tuned if r["spec"]["mode"] == mode]
        best[mode] = max(rows, key=lambda r: r["eval"]["sampled_accuracy"])["spec"]["lr"]

    print(f"phase 3: finals at {best}", flush=True)
    final_specs = [
        {
            "mode": mode,
            "lr": best[mode],
            "seed": seed,
            "steps": args.steps,
            "eval_every": 25,
            "curve_problems": args.curve_problems,
            "folder": str(args.root / "final" / f"{mode}-seed{seed}"),
            "split": "test",
            "problems": args.test_problems,
            "name": f"{mode} seed {seed}",
        }
        | common
        for mode in modes
        for seed in seeds
    ]
    finals = _run_all(final_specs, args.jobs)

    table = [
        {
            "mode": "base",
            "lr": None,
            "greedy": [base_test["accuracy"]],
            "sampled": [base_test["sampled_accuracy"]],
            "trainable_parameters": 0,
            "optimizer_state_bytes": 0,
            "seconds_per_step": 0.0,
        }
    ]
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for mode in modes:
        rows = [r for r in finals if r["spec"]["mode"] == mode]
        table.append(
            {
                "mode": mode,
                "lr": best[mode],
                "greedy": [r["eval"]["accuracy"] for r in rows],
                "sampled": [r["eval"]["sampled_accuracy"] for r in rows],
                "trainable_parameters": rows[0]["summary"]["trainable_parameters"],
                "optimizer_state_bytes": rows[0]["summary"]["optimizer_state_bytes"],
                "seconds_per_step": statistics.fmean(r["summary"]["seconds_per_step"] for r in rows),
            }
        )
        curves[mode] = [json.loads((Path(r["spec"]["folder"]) / "history.json").read_text()) for r in rows]
    means = {row["mode"]: {m: _mean_std(row[m])[0] for m in ("greedy", "sampled")} for row in table}
    for row in table:
        for metric in ("greedy", "sampled"):
            mean, std = _mean_std(row[metric])
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
            gain = means.get("full", {}).get(metric, math.nan) - means["base"][metric]
            row[f"{metric}_recovered"] = (mean - means["base"][metric]) / gain if gain else math.nan

    RESULTS.mkdir(exist_ok=True)
    _plot(curves, base_val["accuracy"], RESULTS / "steering_curves.png")
    record = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.jobs} jobs",
        "settings": vars(args) | {"root": str(args.root)},
        "learning_rates": {
            mode: {
                f"{lr:g}": r["eval"]["sampled_accuracy"]
                for r in tuned
                if r["spec"]["mode"] == mode
                for lr in [r["spec"]["lr"]]
            }
            for mode in modes
        },
        "best_lr": best,
        "base_validation": base_val,
        "table": table,
        "minutes": (time.time() - started) / 60,
    }
    (RESULTS / "steering.json").write_text(json.dumps(record, indent=1))
    print(
        "| mode | lr | greedy test acc | sampled test acc | recovered (greedy / sampled) | trainable | optimizer state | s/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        print(
            f"| {row['mode']} | {row['lr'] if row['lr'] is not None else '–'} "
            f"| {row['greedy_mean']:.3f} ± {row['greedy_std']:.3f} | {row['sampled_mean']:.3f} ± {row['sampled_std']:.3f} "
            f"| {row['greedy_recovered']:.2f} / {row['sampled_recovered']:.2f} | {row['trainable_parameters']:,} "
            f"| {row['optimizer_state_bytes']:,} B | {row['seconds_per_step']:.2f} |"
        )


if __name__ == "__main__":
    main()
