"""Training-step time and peak memory of each SAE architecture against TopK, in one run.

Targets (issue 7): HierarchicalTopK at K = 64, F = 16,384, batch 4,096: step time ≤ 1.3× and peak memory
≤ 1.1× TopK's (the official GPU kernel: 1.33× and 1.0×); KronSAE at F = 16,384: a step ≥ 1.5× faster than
TopK's. Each architecture runs in a fresh subprocess (so peak memory is its own) on the same random
activations (d = 384, the MiniLM width; a step's cost does not depend on the values): a few warm-up steps,
then the median of timed steps of the library's own ``SiteTrainer.step`` (forward, loss, backward, decoder
projection, Adam); the cases run interleaved in ``--rounds`` rounds, and each reports its fastest round's
median (time) and the median over rounds of its peak memory. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on
the CPU the growth of the process's peak RSS (``ru_maxrss``) from just before the SAE is built, which counts
the SAE, its Adam state and every temporary of a step.

    python benchmarks/sae_step_cost.py [--device cuda] [--quick]   # writes benchmarks/results/sae_step_cost.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peers import cpu_model  # benchmarks/ is on sys.path when a script here runs

D, F, B, K = 384, 16_384, 4096, 64
CASES = {  # name -> (architecture, options)
    "topk k=64": ("topk", {"k": K}),
    "hierarchical K=64": ("hierarchical", {"k": K}),
    "topk k=32": ("topk", {"k": 32}),
    "kron h=2048 m=2 n=4 k=32": ("kron", {"k": 32, "heads": 2048, "m": 2, "n": 4}),
    "kron h=1024 m=4 n=4 k=32": ("kron", {"k": 32, "heads": 1024, "m": 4, "n": 4}),
    "kron h=512 m=4 n=8 k=32": ("kron", {"k": 32, "heads": 512, "m": 4, "n": 8}),
}


def measure(architecture: str, options: dict, device: str, steps: int, latents: int, batch: int) -> dict:
    """Time ``steps`` training steps (after 3 warm-up steps) in this process; returns seconds and memory."""
    from interlayer.sae import TrainConfig, make_config
    from interlayer.sae.trainer import SiteTrainer

    dev = torch.device(device)
    x_ND = torch.randn(batch * 4, D, generator=torch.Generator().manual_seed(0)).to(dev)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = make_config(architecture, d_in=D, latents=latents, **options)
    train = TrainConfig(tokens=batch * 100, batch_size=batch, dead_tokens=10**9)
    trainer = SiteTrainer.start(cfg, train, x_ND, dev)
    times = []
    for step in range(3 + steps):
        if step == 3 and dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        batch_BD = x_ND[(step % 4) * batch : (step % 4 + 1) * batch]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.step(batch_BD, 1e-4)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - started)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_mb": peak_mb, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved repetitions of every case.")
    parser.add_argument("--quick", action="store_true", help="F = 2,048, batch 512, 2 steps: a smoke run.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sae_step_cost.json"))
    args = parser.parse_args()
    latents, batch = (2048, 512) if args.quick else (F, B)
    steps = 2 if args.quick else args.steps
    if args.quick:
        args.rounds = 1
    if args.child:
        architecture, options = CASES[args.child]
        if args.quick and architecture == "kron":
            options = {**options, "heads": options["heads"] // 8}
        print(json.dumps(measure(architecture, options, args.device, steps, latents, batch)))
        return
    runs: dict[str, list[dict]] = {name: [] for name in CASES}
    for _ in range(args.rounds):  # cases interleaved, so a burst of load from elsewhere hits all alike
        for name in CASES:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, "--device", args.device, "--steps", str(steps)]
                + (["--quick"] if args.quick else []),
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {
        name: {
            "median_s": min(r["median_s"] for r in rs),  # the least-disturbed round
            "peak_mb": statistics.median(r["peak_mb"] for r in rs),
            "rounds": rs,
        }
        for name, rs in runs.items()
    }
    for name, r in results.items():
        print(f"{name:28s} {r['median_s'] * 1e3:9.1f} ms  peak {r['peak_mb']:8.1f} MB")
    ratios = {
        "hierarchical_time_vs_topk": results["hierarchical K=64"]["median_s"]
        / results["topk k=64"]["median_s"],
        "hierarchical_memory_vs_topk": results["hierarchical K=64"]["peak_mb"]
        / results["topk k=64"]["peak_mb"],
    }
    for name in CASES:
        if name.startswith("kron"):
            ratios[f"topk_k32_time_over_{name.replace(' ', '_')}"] = (
                results["topk k=32"]["median_s"] / results[name]["median_s"]
            )
    for key, value in ratios.items():
        print(f"{key:48s} {value:.3f}")
    record = {
        "machine": {
            "device": args.device,
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "shape": {"d": D, "latents": latents, "batch": batch},
        "results": results,
        "ratios": ratios,
    }
    if not args.quick:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
