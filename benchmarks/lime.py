"""LIMe vs the Llama baseline (transformers' LlamaForCausalLM) at tiny scale on ``stdlib:code``.

1. Equal parameters and tokens: 8 layers, d = 128, 4 heads (d_head 32), context 128, batch 16, ``--steps``
   steps, seeds 0..``--seeds``-1; LIMe, Llama and DenseFormer of one seed start from the same weights and see
   the same batches; validation loss mean ± std over seeds.
2. Deep-narrow pair: a 16-layer LIMe vs a 32-layer Llama at d = 64 (2 heads, d_head 32), same tokens; loss and
   training FLOPs (LIMe spends about half).
3. Loss per FLOP: validation loss against training FLOPs for every run (figure).
4. Step-time overhead at 16 layers (d = 128): LIMe and Llama training steps (forward, backward, AdamW) timed
   alternately in one process on random tokens, ``--timing-steps`` each after 5 warm-up steps; the ratio of
   medians (``benchmarks/lime_step_time.py``, which also runs alone, on CUDA in ``gpu_check.sh``); again at
   d = 512 (8 heads of 64, batch 4), where the mix's memory traffic weighs less against the blocks.
5. Value entropy per layer (matrix Rényi, α = 0.5, features z-scored as the official analysis) of seed 0's
   models of (1) on 64 validation contexts (figure).

Runs are resumable folders under ``--root`` (a rerun reuses finished ones).

    python benchmarks/lime.py [--steps 400] [--seeds 3] [--deep-seeds 1] [--root /work/limeruns]

Writes benchmarks/results/lime.json, lime_loss_flops.png and lime_entropy.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from dataclasses import asdict, replace
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _figures(runs: list[dict], entropy: dict[str, list[float]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for run in runs:
        per_step = run["train_flops"] / run["steps"]
        points = [(r["step"] * per_step, r["val_loss"]) for r in run["history"] if "val_loss" in r]
        style = {"lime": "-", "llama": "--"}.get(run["architecture"], ":")
        ax.plot(*zip(*points, strict=True), style, marker="o", markersize=3, label=run["label"])
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_xscale("log")
    ax.set_title("LIMe vs Llama on stdlib:code: loss per FLOP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    fig.savefig(RESULTS / "lime_loss_flops.png", dpi=120)

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, values in entropy.items():
        ax.plot(range(len(values)), values, marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("Rényi entropy S_0.5 of the values (nats)")
    ax.set_title("Value entropy per layer (8 layers, seed 0)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(RESULTS / "lime_entropy.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--deep-seeds", type=int, default=1)
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--root", type=Path, default=Path("/work/limeruns"))
    args = parser.parse_args()

    import torch
    from lime_step_time import step_times  # this folder is on sys.path when the script runs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from interlayer.data import packed_contexts
    from interlayer.lime.analysis import value_entropy_per_layer
    from interlayer.lime.train import LimeTrainConfig, train
    from interlayer.models import resolve_model_source

    base = LimeTrainConfig(
        layers=8,
        d_model=128,
        heads=4,
        kv_heads=4,
        intermediate=352,
        context_len=128,
        batch_size=16,
        steps=args.steps,
        eval_every=50,
        checkpoint_every=100,
    )
    deep = replace(base, d_model=64, heads=2, kv_heads=2, intermediate=176)
    runs: list[dict] = []
    equal: dict[str, list[float]] = {"lime": [], "llama": [], "denseformer": []}
    for seed in range(args.seeds):
        summary = train(args.root / f"equal-seed{seed}", replace(base, seed=seed), tuple(equal))
        for name, run in summary["runs"].items():
            equal[name].append(run["val_loss"])
            history = json.loads((args.root / f"equal-seed{seed}" / name / "history.json").read_text())
            runs.append(run | {"label": f"{name} 8L d128 seed {seed}", "seed": seed, "history": history})
    deep_runs: dict[str, list[float]] = {"lime-16": [], "llama-32": []}
    deep_flops: dict[str, float] = {}
    for seed in range(args.deep_seeds):
        for name, layers, key in (("lime", 16, "lime-16"), ("llama", 32, "llama-32")):
            folder = args.root / f"deep-{key}-seed{seed}"
            summary = train(folder, replace(deep, layers=layers, seed=seed), (name,))
            run = summary["runs"][name]
            deep_runs[key].append(run["val_loss"])
            deep_flops[key] = run["train_flops"]
            history = json.loads((folder / name / "history.json").read_text())
            runs.append(run | {"label": f"{key} d64 seed {seed}", "seed": seed, "history": history})

    source, _ = resolve_model_source("zoo:code-lm")
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    timing = step_times(replace(base, layers=16), len(tokenizer), args.timing_steps)
    wide = replace(base, layers=16, d_model=512, heads=8, kv_heads=8, intermediate=1360, batch_size=4)
    timing_wide = step_times(wide, len(tokenizer), max(5, args.timing_steps // 2))

    val_NT = packed_contexts(tokenizer, "stdlib:code", "validation", base.context_len, 64)
    entropy = {}
    for name in equal:
        model = AutoModelForCausalLM.from_pretrained(args.root / "equal-seed0" / name / "model").eval()
        entropy[name] = value_entropy_per_layer(model, val_NT)

    RESULTS.mkdir(exist_ok=True)
    _figures(runs, entropy)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "config": {"equal": asdict(base), "deep": asdict(deep)},
        "equal": {name: _mean_std(values) | {"values": values} for name, values in equal.items()},
        "equal_flops": {
            r["architecture"]: r["train_flops"]
            for r in runs
            if r["label"].endswith("seed 0") and "8L" in r["label"]
        },
        "deep_narrow": {
            name: _mean_std(values) | {"values": values, "train_flops": deep_flops[name]}
            for name, values in deep_runs.items()
        },
        "step_time_16_layers": timing,
        "step_time_16_layers_d512": timing_wide,
        "value_entropy": entropy,
        "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs],
    }
    (RESULTS / "lime.json").write_text(json.dumps(result, indent=2, default=str))
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("equal", "deep_narrow", "step_time_16_layers", "step_time_16_layers_d512")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
