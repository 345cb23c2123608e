"""SAE architectures at equal training tokens: HierarchicalTopK's EV-vs-ℓ0 front and KronSAE's EV vs compute.

All SAEs train on the same cached MiniLM activations (``layers.3`` residual, d = 384, ``stdlib:docs`` train
split, read from the cache mixed with the training seed in windows of 4 chunks) for the same number of
tokens (default: one epoch of the split, 368 batches of 1,024), batch, seed, learning-rate rule and AuxK
dead threshold, one at a time through the library's ``train_saes``, and are scored
on held-out tokens (the validation split) with :class:`interlayer.sae.metrics.ReconstructionMetrics`
(pooled EV).

1. HierarchicalTopK Pareto (issue 7, arXiv:2505.24473): one ``hierarchical`` SAE with K = 64 against ``topk``
   SAEs trained at k ∈ {8, 16, 32, 64} and a ``matryoshka`` SAE (BatchTopK k = 32, default prefixes), all
   F = 4,096. Each SAE is evaluated at every k of the set (``sae.reconstruct(x, k=k)``); the Matryoshka also
   at its own inference threshold. Targets: the hierarchical SAE within 0.01 EV of each TopK at that TopK's
   own k, and above every TopK evaluated away from its training k.
2. KronSAE vs compute (arXiv:2505.22255): ``kron`` at F = 4,096 with (m, n) ∈ {(2,2), (2,4), (4,4), (4,8)}
   next to ``topk`` at F ∈ {2,048, 4,096, 8,192}, all k = 32. Per SAE: held-out EV, the median wall time of
   a training step (timed round-robin over all configs, so other processes' load falls on all alike; also
   the median interval between the trainer's ``on_step`` callbacks in its own run), training seconds and
   encoder FLOPs per token (dense 2·F·d, kron 2·h(m+n)·d). Target: at equal training compute KronSAE's EV is
   at least TopK's (TopK's EV interpolated in log-compute between the two nearest TopK widths).

Plots: ``benchmarks/results/hierarchical_pareto.png`` and ``benchmarks/results/kron_compute.png``.

    python benchmarks/sae_architectures.py            # ~10 min on 2 CPU threads; writes the results
    python benchmarks/sae_architectures.py --quick    # smoke run (~1 min), writes nothing to results
    python benchmarks/sae_architectures.py --plot-only  # redraw the PNGs (and print the tables) from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from peers import cpu_model  # benchmarks/ is on sys.path when a script here runs

from interlayer.activations import ActivationCache, Chunk, ChunkPlan, cache_activations
from interlayer.models import load_model
from interlayer.sae import make_config
from interlayer.sae.io import load_sae
from interlayer.sae.metrics import ReconstructionMetrics
from interlayer.sae.trainer import TrainConfig, train_saes

SITE = "layers.3"
KS = (8, 16, 32, 64)
MIX_CHUNKS = 4


def cached(lm, split: str, tokens: int, folder: Path) -> ActivationCache:
    return cache_activations(lm, [SITE], "stdlib:docs", tokens, folder, ChunkPlan(128, 32, 8), split=split)


def train_one(cache: ActivationCache, name: str, cfg, train_cfg: TrainConfig) -> dict:
    """Train one SAE on the cache's mixed chunk stream; return the SAE and its per-step wall times."""

    def chunks(start: int) -> Iterator[Chunk]:
        return cache.chunks(start, [SITE], seed=train_cfg.seed, mix_chunks=MIX_CHUNKS)

    stamps: list[float] = []

    def on_step(step: int, summaries) -> None:
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        metrics = train_saes(out, chunks, {SITE: cfg}, train_cfg, {}, on_step=on_step)
        seconds = time.perf_counter() - started
        sae = load_sae(Path(out) / SITE)
    sae.eval()
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    step_s = statistics.median(intervals) if intervals else seconds
    summary = metrics["sites"][SITE]
    print(
        f"  trained {name}: {metrics['steps']} steps in {seconds:.1f} s, median step {step_s * 1e3:.1f} ms, "
        f"train FVU {summary['fvu']:.4f}",
        flush=True,
    )
    return {
        "sae": sae,
        "steps": metrics["steps"],
        "tokens": metrics["tokens"],
        "wall_seconds": seconds,
        "step_seconds_median": step_s,
        "train_seconds": step_s * metrics["steps"],
        "train_fvu_ema": summary["fvu"],
    }


@torch.no_grad()
def evaluate(sae, heldout_ND: torch.Tensor, k: int | None, batch: int = 4096) -> dict:
    """Pooled held-out metrics of ``sae`` at budget ``k`` (None: the SAE's own inference rule)."""
    metrics = ReconstructionMetrics(sae.cfg.latents)
    for x in heldout_ND.split(batch):
        x_hat, z = sae.reconstruct(x, k=k)
        metrics.update(x, x_hat, z)
    r = metrics.result()
    return {key: r[key] for key in ("explained_variance", "l0", "dead_latents", "dense_latents")}


def interleaved_step_seconds(cfgs: dict, x_ND: torch.Tensor, train_cfg: TrainConfig, rounds: int) -> dict:
    """Median seconds of one ``SiteTrainer.step`` per config, timed round-robin (2 steps per config per round,
    after one warm-up round), so that the load of other processes on this shared machine falls on every
    config alike."""
    from interlayer.sae.trainer import SiteTrainer

    B = train_cfg.batch_size
    trainers = {
        name: SiteTrainer.start(cfg, train_cfg, x_ND, torch.device("cpu")) for name, cfg in cfgs.items()
    }
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for r in range(rounds + 1):
        for name, trainer in trainers.items():
            for s in range(2):
                batch = x_ND[((2 * r + s) % (x_ND.shape[0] // B)) * B :][:B]
                started = time.perf_counter()
                trainer.step(batch, train_cfg.lr_for(cfgs[name].latents))
                if r > 0:
                    times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def encoder_flops(cfg) -> int:
    """Multiply-adds ×2 of the encoder matmul per token: dense 2·F·d, kron 2·h(m+n)·d."""
    if cfg.architecture == "kron":
        return 2 * cfg.heads * (cfg.m + cfg.n) * cfg.d_in
    return 2 * cfg.latents * cfg.d_in


def interpolate_log(x: float, points: list[tuple[float, float]]) -> float | None:
    """y at x by linear interpolation in log(x) between sorted (x, y) points; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def part_pareto(cache, heldout_ND, args, train_cfg, d: int, runs: dict) -> dict:
    F = args.latents
    rows: list[dict] = []
    specs = [("hierarchical K=64", "hierarchical", {"k": max(KS)})]
    specs += [(f"topk k={k}", "topk", {"k": k}) for k in KS]
    specs += [("matryoshka k=32", "matryoshka", {"k": 32})]
    for name, arch, options in specs:
        cfg = make_config(arch, d_in=d, latents=F, **options)
        run = runs[name] = train_one(cache, name, cfg, train_cfg)
        run["config"] = {"architecture": arch, "latents": F, **options}
        evals = [(k, evaluate(run["sae"], heldout_ND, k)) for k in KS]
        if arch == "matryoshka":
            evals.insert(0, (None, evaluate(run["sae"], heldout_ND, None)))
        for k, ev in evals:
            rows.append({"sae": name, "architecture": arch, "train_k": options["k"], "eval_k": k, **ev})
            print(f"    {name} eval k={k}: EV {ev['explained_variance']:.4f}, L0 {ev['l0']:.1f}", flush=True)
    ev_of = {(r["sae"], r["eval_k"]): r["explained_variance"] for r in rows}
    targets = []
    for k in KS:
        hier, own = ev_of[("hierarchical K=64", k)], ev_of[(f"topk k={k}", k)]
        targets.append(
            {
                "target": f"hierarchical within 0.01 EV of topk k={k} at k={k}",
                "hierarchical_ev": hier,
                "topk_ev": own,
                "difference": hier - own,
                "met": hier >= own - 0.01,
            }
        )
    for k in KS:
        hier = ev_of[("hierarchical K=64", k)]
        away = {kt: ev_of[(f"topk k={kt}", k)] for kt in KS if kt != k}
        best_kt = max(away, key=away.get)
        targets.append(
            {
                "target": f"hierarchical above every topk trained at k≠{k}, evaluated at k={k}",
                "hierarchical_ev": hier,
                "best_away_topk": f"topk k={best_kt}",
                "best_away_topk_ev": away[best_kt],
                "difference": hier - away[best_kt],
                "met": all(hier > v for v in away.values()),
            }
        )
    return {"latents": F, "ks": list(KS), "rows": rows, "targets": targets}


def part_kron(cache, heldout_ND, args, train_cfg, d: int, runs: dict) -> dict:
    rows = []
    specs = [(f"topk F={F} k=32", "topk", {"k": 32}, F) for F in args.topk_widths]
    for m, n in args.kron_shapes:
        F = args.latents
        specs.append((f"kron h={F // (m * n)} m={m} n={n} k=32", "kron", {"k": 32, "m": m, "n": n}, F))
    cfgs = {name: make_config(arch, d_in=d, latents=F, **options) for name, arch, options, F in specs}
    first_ND = next(iter(cache.chunks(0, [SITE]))).acts[SITE]
    print("  timing steps round-robin ...", flush=True)
    interleaved = interleaved_step_seconds(cfgs, first_ND, train_cfg, args.timing_rounds)
    for name, arch, _, F in specs:
        cfg = cfgs[name]
        key = "topk k=32" if (arch == "topk" and args.latents == F) else name  # reuse the Pareto run
        if key not in runs:
            runs[key] = train_one(cache, name, cfg, train_cfg)
        run = runs[key]
        ev = evaluate(run["sae"], heldout_ND, None)
        row = {
            "sae": name,
            "architecture": arch,
            "latents": F,
            "k": 32,
            "heads": getattr(cfg, "heads", None),
            "m": getattr(cfg, "m", None),
            "n": getattr(cfg, "n", None),
            "encoder_rows": cfg.heads * (cfg.m + cfg.n) if arch == "kron" else F,
            "encoder_flops_per_token": encoder_flops(cfg),
            "steps": run["steps"],
            "tokens": run["tokens"],
            "step_seconds_median": run["step_seconds_median"],
            "train_seconds": run["train_seconds"],
            "wall_seconds": run["wall_seconds"],
            "train_encoder_flops": encoder_flops(cfg) * run["tokens"],
            "step_seconds_interleaved": interleaved[name],
            "train_seconds_interleaved": interleaved[name] * run["steps"],
            **ev,
        }
        rows.append(row)
        print(
            f"    {name}: EV {ev['explained_variance']:.4f}, step {row['step_seconds_median'] * 1e3:.1f} ms, "
            f"enc FLOPs/token {row['encoder_flops_per_token']:,}",
            flush=True,
        )
    topk = [r for r in rows if r["architecture"] == "topk"]
    targets = []
    for r in (r for r in rows if r["architecture"] == "kron"):
        same_f = next((t for t in topk if t["latents"] == r["latents"]), None)
        for axis in ("train_seconds", "train_seconds_interleaved", "encoder_flops_per_token"):
            ref = interpolate_log(r[axis], [(t[axis], t["explained_variance"]) for t in topk])
            targets.append(
                {
                    "target": f"{r['sae']}: EV ≥ topk at equal {axis}",
                    "axis": axis,
                    "kron_ev": r["explained_variance"],
                    "topk_ev_interpolated": ref,
                    "difference": None if ref is None else r["explained_variance"] - ref,
                    "met": None if ref is None else r["explained_variance"] >= ref,
                }
            )
        r["ev_minus_topk_same_F"] = (
            None if same_f is None else r["explained_variance"] - same_f["explained_variance"]
        )
    return {"rows": rows, "targets": targets}


def plot_pareto(pareto: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    by_sae: dict[str, list[dict]] = {}
    for r in pareto["rows"]:
        by_sae.setdefault(r["sae"], []).append(r)
    colours = {8: "tab:blue", 16: "tab:orange", 32: "tab:green", 64: "tab:red"}
    for name, rs in by_sae.items():
        topk_rows = [r for r in rs if r["eval_k"] is not None]
        xs = [r["l0"] for r in topk_rows]
        ys = [r["explained_variance"] for r in topk_rows]
        if name.startswith("hierarchical"):
            ax.plot(xs, ys, "k-o", lw=2.5, label=f"{name} (one SAE, top-k inference)", zorder=5)
        elif name.startswith("topk"):
            c = colours[rs[0]["train_k"]]
            ax.plot(xs, ys, "--", color=c, alpha=0.6)
            own = next(r for r in rs if r["eval_k"] == r["train_k"])
            ax.plot(
                [own["l0"]], [own["explained_variance"]], "s", color=c, ms=9, label=f"{name} at its own k"
            )
            ax.plot(xs, ys, ".", color=c)
        else:
            ax.plot(xs, ys, ":^", color="tab:purple", label=f"{name}, top-k inference")
            thr = next(r for r in rs if r["eval_k"] is None)
            ax.plot(
                [thr["l0"]],
                [thr["explained_variance"]],
                "*",
                color="tab:purple",
                ms=14,
                label=f"{name}, threshold inference (L0 {thr['l0']:.1f})",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(KS), [str(k) for k in KS])
    ax.set_xlabel("ℓ0 (active latents per token, held out)")
    ax.set_ylabel("explained variance (held out, pooled)")
    ax.set_title(f"MiniLM layers.3, F = {pareto['latents']:,}: EV vs ℓ0 (dashed: TopK away from its k)")
    lo = min(r["explained_variance"] for r in pareto["rows"])
    ax.set_ylim(max(lo - 0.02, 0.0), None)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kron(kron: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    topk = sorted((r for r in kron["rows"] if r["architecture"] == "topk"), key=lambda r: r["latents"])
    kr = [r for r in kron["rows"] if r["architecture"] == "kron"]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for ax, axis, label in (
        (
            axes[0],
            "train_seconds_interleaved",
            "training time (s): steps × median step (filled: round-robin timing; hollow: in-run timing)",
        ),
        (axes[1], "encoder_flops_per_token", "encoder FLOPs per token"),
    ):
        ys = [r["explained_variance"] for r in topk]
        ax.plot([r[axis] for r in topk], ys, "k-o", label="topk, k=32 (F = 2,048 / 4,096 / 8,192)")
        if axis == "train_seconds_interleaved":
            ax.plot([r["train_seconds"] for r in topk], ys, "k:o", mfc="none")
        for r in topk:
            ax.annotate(
                f"F={r['latents']:,}",
                (r[axis], r["explained_variance"]),
                textcoords="offset points",
                xytext=(5, -12),
                fontsize=8,
            )
        for colour, r in zip(colours, kr, strict=False):
            ax.plot(
                [r[axis]],
                [r["explained_variance"]],
                "D",
                color=colour,
                ms=8,
                label=f"kron F={r['latents']:,} (h,m,n)=({r['heads']},{r['m']},{r['n']})",
            )
            if axis == "train_seconds_interleaved":
                ax.plot([r["train_seconds"]], [r["explained_variance"]], "D", color=colour, mfc="none")
        ax.set_xscale("log")
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("explained variance (held out, pooled)")
        ax.grid(True, alpha=0.3, which="both")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("KronSAE vs TopK at equal tokens, k = 32: EV vs training compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_tables(report: dict) -> None:
    p = report["hierarchical_pareto"]
    print(f"\n| SAE (F = {p['latents']}) | " + " | ".join(f"EV @ k={k}" for k in KS) + " | threshold (L0) |")
    print("|---|" + "---:|" * (len(KS) + 1))
    by_sae: dict[str, dict] = {}
    for r in p["rows"]:
        by_sae.setdefault(r["sae"], {})[r["eval_k"]] = r
    for name, evs in by_sae.items():
        cells = []
        for k in KS:
            v = evs[k]["explained_variance"]
            cells.append(f"**{v:.4f}**" if evs[k]["train_k"] == k and name.startswith("topk") else f"{v:.4f}")
        thr = evs.get(None)
        thr_cell = f"{thr['explained_variance']:.4f} ({thr['l0']:.1f})" if thr else "—"
        print(f"| {name} | " + " | ".join(cells) + f" | {thr_cell} |")
    print("\n| target | hierarchical EV | reference EV | difference | met |\n|---|---:|---:|---:|---|")
    for t in p["targets"]:
        ref = t.get("topk_ev", t.get("best_away_topk_ev"))
        print(
            f"| {t['target']} | {t['hierarchical_ev']:.4f} | {ref:.4f} | {t['difference']:+.4f} | "
            f"{'met' if t['met'] else 'not met'} |"
        )
    k = report["kron_compute"]
    print(
        "\n| SAE | F | encoder rows | encoder FLOPs/token | median step (ms) | round-robin step (ms) | "
        "train s | held-out EV | dead | EV − topk same F |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in k["rows"]:
        diff = r.get("ev_minus_topk_same_F")
        print(
            f"| {r['sae']} | {r['latents']:,} | {r['encoder_rows']:,} | {r['encoder_flops_per_token']:,} | "
            f"{r['step_seconds_median'] * 1e3:.1f} | {r['step_seconds_interleaved'] * 1e3:.1f} | {r['train_seconds']:.1f} | {r['explained_variance']:.4f} | "
            f"{r['dead_latents']} | {'—' if diff is None else f'{diff:+.4f}'} |"
        )
    print("\n| target | kron EV | topk EV (interpolated) | difference | met |\n|---|---:|---:|---:|---|")
    for t in k["targets"]:
        if t["met"] is None:
            print(f"| {t['target']} | {t['kron_ev']:.4f} | outside topk range | — | n/a |")
        else:
            print(
                f"| {t['target']} | {t['kron_ev']:.4f} | {t['topk_ev_interpolated']:.4f} | "
                f"{t['difference']:+.4f} | {'met' if t['met'] else 'not met'} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~1 min); writes nothing to results")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per SAE")
    parser.add_argument("--heldout", type=int, default=None, help="held-out tokens")
    parser.add_argument("--latents", type=int, default=4096, help="F of the Pareto SAEs and of the kron SAEs")
    parser.add_argument("--topk-widths", type=int, nargs="+", default=None)
    parser.add_argument("--kron-shapes", type=str, nargs="+", default=None, help="m,n pairs, e.g. 2,4 4,4")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr", type=float, default=None, help="peak lr for every SAE (default: library rule)"
    )
    parser.add_argument(
        "--dead-tokens",
        type=int,
        default=131_072,
        help="tokens without firing before AuxK may use a latent (the library's 1M exceeds this run's ~377k)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--timing-rounds", type=int, default=None, help="rounds of the round-robin step timing"
    )
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the PNGs from the results JSON, training nothing"
    )
    args = parser.parse_args()
    if args.plot_only:
        report = json.loads((args.results / "sae_architectures.json").read_text())
        plot_pareto(report["hierarchical_pareto"], args.results / "hierarchical_pareto.png")
        plot_kron(report["kron_compute"], args.results / "kron_compute.png")
        print_tables(report)
        return
    if args.quick:
        args.tokens = args.tokens or 20 * args.batch_size
        args.heldout = args.heldout or 4096
        args.topk_widths = args.topk_widths or [2048, args.latents]
        args.kron_shapes = args.kron_shapes or ["2,4"]
        args.timing_rounds = args.timing_rounds or 1
    args.timing_rounds = args.timing_rounds or 3
    args.heldout = args.heldout or 10**9  # the whole validation split (about 28k kept tokens)
    args.topk_widths = args.topk_widths or [2048, 4096, 8192]
    args.kron_shapes = [
        tuple(int(v) for v in s.split(",")) for s in (args.kron_shapes or ["2,2", "2,4", "4,4", "4,8"])
    ]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    lm = load_model("minilm")
    d = 384
    # stdlib:docs' train split holds about 382k kept tokens: by default train for one epoch of it, i.e. every
    # full batch of every chunk (mixing keeps each chunk's row count; a chunk's ragged tail is dropped).
    train_cache = cached(lm, "train", args.tokens or 10**9, args.cache / "arch-minilm-train")
    available = sum(s["tokens"] // args.batch_size for s in train_cache.manifest["shards"]) * args.batch_size
    args.tokens = min(args.tokens or available, available)
    heldout_ND = cached(lm, "validation", args.heldout, args.cache / "arch-minilm-validation").site_tensor(
        SITE, args.heldout
    )
    d = heldout_ND.shape[1]
    print(
        f"cache ready in {time.perf_counter() - started:.0f} s: {train_cache.manifest['tokens']:,} train tokens, "
        f"{heldout_ND.shape[0]:,} held-out",
        flush=True,
    )
    train_cfg = TrainConfig(
        tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        dead_tokens=args.dead_tokens,
        checkpoint_seconds=1e9,
    )
    runs: dict[str, dict] = {}
    pareto = part_pareto(train_cache, heldout_ND, args, train_cfg, d, runs)
    kron = part_kron(train_cache, heldout_ND, args, train_cfg, d, runs)
    report = {
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "note": "shared 2-core machine; wall-clock seconds vary by about ±15% between runs",
        },
        "settings": {
            "model": "minilm",
            "site": SITE,
            "data": "stdlib:docs",
            "d": d,
            "train_tokens_per_sae": train_cfg.steps * train_cfg.batch_size,
            "steps": train_cfg.steps,
            "batch_size": args.batch_size,
            "heldout_tokens": heldout_ND.shape[0],
            "seed": args.seed,
            "lr": args.lr,
            "lr_rule": "4e-3·(F/2^14)^(-1/4) per SAE (TrainConfig.lr=None)" if args.lr is None else "fixed",
            "lr_by_width": {str(F): train_cfg.lr_for(F) for F in sorted({args.latents, *args.topk_widths})},
            "lr_decay_fraction": train_cfg.lr_decay_fraction,
            "dead_tokens": train_cfg.dead_tokens,
            "mix_chunks": MIX_CHUNKS,
            "latents": args.latents,
            "k_pareto": list(KS),
            "k_kron": 32,
            "topk_widths": args.topk_widths,
            "kron_shapes_mn": [list(s) for s in args.kron_shapes],
        },
        "hierarchical_pareto": pareto,
        "kron_compute": kron,
        "total_seconds": time.perf_counter() - started,
    }
    print_tables(report)
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            plot_pareto(pareto, Path(tmp) / "p.png")
            plot_kron(kron, Path(tmp) / "k.png")
        print(f"\nquick run done in {report['total_seconds']:.0f} s (nothing written)")
        return
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "sae_architectures.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_pareto(pareto, args.results / "hierarchical_pareto.png")
    plot_kron(kron, args.results / "kron_compute.png")
    print(f"\nwrote {args.results}/sae_architectures.json and the PNGs in {report['total_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
