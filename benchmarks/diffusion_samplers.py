"""Every sampler at steps ∈ {8, 16, 32, 64, 128} on zoo:code-mdlm, G-Star's remasker ablation, and the
sampling overhead — the G-Star paper's comparison (arXiv:2510.08369) at small scale.

Phases (resumable: every remasker run and every cell is kept under ``--root`` and reused on a rerun):

1. the remaskers for zoo:code-mdlm on stdlib:code: ``all`` blocks fine-tuned (the official default), the
   ``first`` block only, and the ``head`` only on the frozen denoiser, ``--remasker-steps`` steps each
   (BCE, lr 1e-4), with their validation precision / recall / F1;
2. the grid: each sampler × step count draws ``--samples`` unconditional samples of 64 tokens with the same
   per-sample seeds (T = 1, nucleus 0.9 for every sampler) and scores generative perplexity under
   zoo:code-lm, unigram entropy, n-gram diversity, Python validity, NFE, wall time and overhead;
3. the ablation: G-Star with each remasker at 16 and 32 steps.

No peer library is run: MDLM, ReMDM and G-Star are research repositories (Hydra configs, not on PyPI);
their samplers are re-implemented in interlayer.diffusion.samplers and compared here in one run.

    python benchmarks/diffusion_samplers.py [--root /work/diffruns] [--samples 256]

Writes benchmarks/results/diffusion_samplers.json and diffusion_samplers.png and prints the tables of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
DENOISER, SCORER = "zoo:code-mdlm", "zoo:code-lm"
GRID = [
    ("mdlm", "hybrid"),
    ("llada", "hybrid"),
    ("remdm-cap", "hybrid"),
    ("remdm-rescale", "hybrid"),
    ("remdm-conf", "hybrid"),
    ("remdm-loop", "hybrid"),
    ("star", "hybrid"),
    ("star-conf", "hybrid"),
    ("gstar", "hybrid"),
    ("gstar", "loop"),
]
ABLATION = ("all", "first", "head")


def _remaskers(
    root: Path, denoiser: Any, tokenizer: Any, steps: int, inits: tuple[str, ...] = ABLATION
) -> dict[str, dict[str, Any]]:
    from interlayer.diffusion.remasker import RemaskerConfig
    from interlayer.diffusion.train import train_remasker

    out = {}
    for init in inits:
        cfg = RemaskerConfig(init=init, layers=1, steps=steps, eval_every=steps, checkpoint_every=50)
        folder = root / f"remasker-{init}-{steps}"
        out[init] = train_remasker(denoiser, tokenizer, folder, "stdlib:code", cfg) | {"folder": str(folder)}
    return out


def _cell(root: Path, key: str, compute: Any) -> dict[str, Any]:
    path = root / "cells" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from interlayer.atomic import write_json

    row = compute()
    write_json(path, row)
    return row


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = sorted({r["sampler"] for r in rows}, key=[r["sampler"] for r in rows].index)
    for label in labels:
        mine = sorted((r for r in rows if r["sampler"] == label), key=lambda r: r["steps"])
        style = "-o" if label.startswith("gstar") else "--."
        for ax, key in zip(axes, ("gen_ppl", "entropy", "python_validity"), strict=True):
            ax.plot([r["steps"] for r in mine], [r[key] for r in mine], style, label=label)
    for ax, title in zip(
        axes,
        ("generative perplexity (zoo:code-lm) ↓", "unigram entropy (nats)", "valid-Python fraction ↑"),
        strict=True,
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps")
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("samplers on zoo:code-mdlm (64 tokens, T = 1, top-p 0.9)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _at_entropy(rows: list[dict[str, Any]], sampler: str, entropy: float) -> float | None:
    """The sampler's generative perplexity at ``entropy``, interpolated (log-linearly) between the two of its
    cells (any step count) whose entropies bracket it; None outside its range."""
    import math

    points = sorted((r["entropy"], r["gen_ppl"]) for r in rows if r["sampler"] == sampler)
    for (h0, p0), (h1, p1) in itertools.pairwise(points):
        if h0 <= entropy <= h1 and h1 > h0:
            w = (entropy - h0) / (h1 - h0)
            return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
    return None


def _verdict(rows: list[dict[str, Any]], steps: int, tolerance: float) -> dict[str, Any]:
    """G-Star vs MDLM and the best ReMDM (lowest gen. PPL among those within the entropy tolerance)."""
    at = {r["sampler"]: r for r in rows if r["steps"] == steps}
    if not {"gstar", "mdlm"} <= at.keys() or not any(name.startswith("remdm") for name in at):
        return {"steps": steps, "skipped": "needs gstar, mdlm and a remdm sampler in the grid"}
    g = at["gstar"]
    remdm = [r for name, r in at.items() if name.startswith("remdm")]
    matched = [r for r in remdm if abs(r["entropy"] - g["entropy"]) <= tolerance * g["entropy"]]
    best = min(matched or remdm, key=lambda r: r["gen_ppl"])
    mdlm = at["mdlm"]
    return {
        "steps": steps,
        "gstar": g["gen_ppl"],
        "gstar_entropy": g["entropy"],
        "gstar_interval": [g["gen_ppl_low"], g["gen_ppl_high"]],
        "mdlm": mdlm["gen_ppl"],
        "mdlm_interval": [mdlm["gen_ppl_low"], mdlm["gen_ppl_high"]],
        "mdlm_entropy": mdlm["entropy"],
        "best_remdm": best["sampler"],
        "best_remdm_ppl": best["gen_ppl"],
        "best_remdm_interval": [best["gen_ppl_low"], best["gen_ppl_high"]],
        "best_remdm_entropy": best["entropy"],
        "entropy_matched": abs(mdlm["entropy"] - g["entropy"]) <= tolerance * g["entropy"] and bool(matched),
        "beats_both": g["gen_ppl"] < mdlm["gen_ppl"] and g["gen_ppl"] < best["gen_ppl"],
        "beats_both_beyond_intervals": g["gen_ppl_high"] < min(mdlm["gen_ppl_low"], best["gen_ppl_low"]),
        "at_gstar_entropy": {
            name: _at_entropy(rows, name, g["entropy"])
            for name in sorted({r["sampler"] for r in rows})
            if name in ("mdlm", "star", "star-conf") or name.startswith("remdm")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("/work/diffruns"))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", default="8,16,32,64,128")
    parser.add_argument("--remasker-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--entropy-tolerance", type=float, default=0.02, help="relative entropy gap called matched"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the remaskers are trained on it too)")
    parser.add_argument("--denoiser", default=DENOISER, help="a folder works too (the GPU check carries one)")
    parser.add_argument("--scorer", default=SCORER)
    parser.add_argument("--samplers", default="", help="comma-separated labels of GRID to run (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and PNG go")
    parser.add_argument(
        "--ablation", action=argparse.BooleanOptionalAction, default=True, help="remasker ablation"
    )
    args = parser.parse_args()

    import torch

    from interlayer.diffusion.denoiser import load_denoiser
    from interlayer.diffusion.evaluate import cell_metrics
    from interlayer.diffusion.remasker import load_remasker
    from interlayer.diffusion.samplers import SamplerConfig, sample
    from interlayer.diffusion.templates import build_templates
    from interlayer.models import load_model

    started = time.time()
    args.root.mkdir(parents=True, exist_ok=True)
    denoiser, tokenizer = load_denoiser(args.denoiser, device=args.device)
    scorer = load_model(args.scorer, device=args.device)
    inits = ABLATION if args.ablation else ("all",)
    trained = _remaskers(args.root, denoiser, tokenizer, args.remasker_steps, inits)
    remaskers = {init: load_remasker(info["folder"], denoiser) for init, info in trained.items()}
    length = int(denoiser.network.config.max_position_embeddings)
    template, attention = build_templates(tokenizer, denoiser.mask_id, args.samples, length)
    steps = [int(s) for s in args.steps.split(",")]

    def run(config: SamplerConfig, remasker: Any) -> dict[str, Any]:
        result = sample(denoiser, config, template, attention, 0, args.batch_size, remasker, progress=True)
        row = cell_metrics(result, tokenizer, scorer, with_texts=True)
        row["examples"] = row.pop("texts")[:4]
        return row

    wanted = {label for label in args.samplers.split(",") if label}
    rows = []
    for name, schedule in GRID:
        for n in steps:
            config = SamplerConfig(sampler=name, steps=n, schedule=schedule)
            if wanted and config.label() not in wanted:
                continue
            key = f"{config.label()}-{n}-{args.samples}-r{args.remasker_steps}-{args.device}"
            remasker = remaskers["all"] if name == "gstar" else None
            rows.append(
                {
                    "sampler": config.label(),
                    "steps": n,
                    **_cell(args.root, key, lambda c=config, r=remasker: run(c, r)),
                }
            )
            print(
                f"{config.label():>14} {n:>4}: gen PPL {rows[-1]['gen_ppl']:7.2f}  H {rows[-1]['entropy']:.3f}  "
                f"valid {rows[-1]['python_validity']:.3f}  NFE {rows[-1]['nfe']:.1f}+{rows[-1]['remasker_nfe']:.1f}  "
                f"overhead {rows[-1]['overhead']:.1%}",
                flush=True,
            )
    ablation = []
    for init in inits if args.ablation and (not wanted or "gstar" in wanted) else ():
        for n in [n for n in (16, 32) if n in steps]:
            config = SamplerConfig(sampler="gstar", steps=n)
            key = f"gstar-{init}-{n}-{args.samples}-r{args.remasker_steps}-{args.device}"
            row = _cell(args.root, key, lambda c=config, r=remaskers[init]: run(c, r))
            ablation.append(
                {
                    "remasker": init,
                    "steps": n,
                    **row,
                    **{f"val_{k}": trained[init][f"val_{k}"] for k in ("precision", "recall", "f1")},
                }
            )
    verdicts = [_verdict(rows, n, args.entropy_tolerance) for n in (16, 32) if n in steps]
    args.results.mkdir(parents=True, exist_ok=True)
    _plot(rows, args.results / "diffusion_samplers.png")
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {platform.platform()}",
        "device": args.device,
        "samples_per_cell": args.samples,
        "length": length,
        "remaskers": {
            k: {
                kk: v
                for kk, v in info.items()
                if kk.startswith("val_") or kk in ("trainable_parameters", "steps")
            }
            for k, info in trained.items()
        },
        "rows": rows,
        "ablation": ablation,
        "verdicts": verdicts,
        "minutes": (time.time() - started) / 60,
    }
    (args.results / "diffusion_samplers.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        "\n| sampler | steps | gen PPL [95% interval] | entropy | diversity | valid Python | NFE (+remasker) | s/sample | overhead |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['sampler']} | {r['steps']} | {r['gen_ppl']:.1f} [{r['gen_ppl_low']:.1f}, {r['gen_ppl_high']:.1f}] | {r['entropy']:.3f} | {r['diversity']:.3f} | "
            f"{r['python_validity']:.3f} | {r['nfe']:.1f} (+{r['remasker_nfe']:.1f}) | {r['seconds_per_sample']:.4f} | {r['overhead']:.1%} |"
        )
    print("\n| remasker | steps | val P / R / F1 | gen PPL [95% interval] | entropy | valid |")
    print("|---|---|---|---|---|---|")
    for r in ablation:
        print(
            f"| {r['remasker']} | {r['steps']} | {r['val_precision']:.3f} / {r['val_recall']:.3f} / {r['val_f1']:.3f} | "
            f"{r['gen_ppl']:.1f} [{r['gen_ppl_low']:.1f}, {r['gen_ppl_high']:.1f}] | {r['entropy']:.3f} | {r['python_validity']:.3f} |"
        )
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    main()
