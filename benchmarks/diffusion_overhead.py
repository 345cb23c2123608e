"""Sampling overhead beyond the network calls, per sampler, with and without the nucleus.

Each sampler draws ``--samples`` samples of 64 tokens from zoo:code-mdlm at ``--steps`` steps (G-Star with a
one-block remasker trained for 50 steps: only its cost matters here), once with top-p 0.9 and once with the
nucleus off. Overhead = 1 − (time inside denoiser and remasker calls) / wall time of the call; the network
time includes SUBS's log-softmax. A torch.profiler table of the largest operators outside the model is
printed for G-Star with top-p 0.9.

    python benchmarks/diffusion_overhead.py [--samples 256] [--steps 32]

Writes benchmarks/results/diffusion_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SAMPLERS = ("mdlm", "llada", "remdm-cap", "remdm-conf", "star", "star-conf", "gstar")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--root", type=Path, default=Path("/work/diffruns"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from interlayer.diffusion import (
        RemaskerConfig,
        SamplerConfig,
        build_templates,
        load_denoiser,
        load_remasker,
        sample,
        train_remasker,
    )

    denoiser, tokenizer = load_denoiser("zoo:code-mdlm", device=args.device)
    folder = args.root / "remasker-overhead"
    train_remasker(
        denoiser, tokenizer, folder, "stdlib:code", RemaskerConfig(init="first", steps=50, eval_every=50)
    )
    remasker = load_remasker(folder, denoiser)
    template, attention = build_templates(tokenizer, denoiser.mask_id, args.samples, 64)
    rows = []
    for name in SAMPLERS:
        for top_p in (0.9, 1.0):
            config = SamplerConfig(sampler=name, steps=args.steps, top_p=top_p)
            result = sample(
                denoiser, config, template, attention, 0, 128, remasker if name == "gstar" else None
            )
            overhead = 1 - result.network_seconds / result.seconds
            rows.append({"sampler": name, "top_p": top_p, "seconds": result.seconds, "overhead": overhead})
            print(f"{name:>10} top-p {top_p}: {result.seconds:6.1f} s, overhead {overhead:.1%}", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sample(
            denoiser, SamplerConfig(sampler="gstar", steps=args.steps), template, attention, 0, 128, remasker
        )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "diffusion_overhead.json").write_text(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "device": args.device,
                "samples": args.samples,
                "steps": args.steps,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
