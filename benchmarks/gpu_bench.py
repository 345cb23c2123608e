"""SAE training on a GPU: interlayer's TopK, BatchTopK and HierarchicalTopK against EleutherAI sparsify's TopK
on the same activations, in one run (part of ``benchmarks/gpu_check.sh``).

Activations: MiniLM ``layers.3`` on ``stdlib:docs`` (train split for training, validation split held out),
the model forward under bf16 autocast; the SAEs keep fp32 master weights and read fp32 activations, which sit
on the device before the clock starts. Each SAE trains one pass over the same tokens, one optimiser step per
batch, each library with its own defaults (sparsify: schedule-free signum); reported: training tokens per
second (the clock stops after a device synchronise), held-out FVU (pooled, the same function for all), L0,
and each row's speed relative to sparsify's TopK.

    python benchmarks/gpu_bench.py [--device cuda] [--quick]     # prints a table; JSON to --out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peers import cpu_model  # noqa: E402
from sae_train import train_ours  # noqa: E402

from interlayer.activations import ChunkPlan, model_chunks  # noqa: E402
from interlayer.models import load_model  # noqa: E402
from interlayer.sites import resolve_sites  # noqa: E402

SITE = "layers.3"


def activations(lm, split: str, tokens: int, device: torch.device) -> torch.Tensor:
    """``tokens`` kept-token activations at SITE, the model run under bf16 autocast, as fp32 on ``device``."""
    parts, total = [], 0
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        for chunk in model_chunks(
            lm, resolve_sites(lm.model, SITE), "stdlib:docs", ChunkPlan(128, 64, 4), split
        ):
            parts.append(chunk.acts[SITE].float())
            total += chunk.tokens
            if total >= tokens:
                break
    return torch.cat(parts)[:tokens].to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="A small run that checks the script end to end.")
    parser.add_argument(
        "--tokens",
        type=int,
        default=90 * 4096,
        help="Training tokens (stdlib:docs' train split holds ~382k).",
    )
    parser.add_argument("--latents", type=int, default=32_768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_bench.json"))
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.latents, args.batch_size = 8 * 1024, 2048, 1024
    device = torch.device(args.device)
    torch.manual_seed(0)
    lm = load_model("minilm", device=str(device))
    train_ND = activations(lm, "train", args.tokens, device)
    heldout_ND = activations(lm, "validation", max(4096, args.tokens // 16), device)
    del lm
    shape = (args.latents, args.k, args.batch_size)
    results = []
    try:  # sparsify needs datasets, accelerate, einops, …: without them, report ours alone and say why
        from peers import train_sparsify

        results.append(train_sparsify(train_ND, heldout_ND, *shape, None, 0, device=str(device)))
    except Exception as exc:  # a peer that cannot run must not hide our rows
        print(f"sparsify not run: {type(exc).__name__}: {exc}")
    results += [
        train_ours(train_ND, heldout_ND, *shape, 0, None, a) for a in ("topk", "batchtopk", "hierarchical")
    ]
    base = results[0].tokens_per_s
    print(f"\nGPU SAE training: d = {train_ND.shape[1]}, F = {args.latents}, k = {args.k} (hierarchical: K = k), "
          f"batch {args.batch_size}, {results[0].tokens} tokens, {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else cpu_model()})")  # fmt: skip
    print(f"| run | tokens/s | vs {results[0].name} | held-out FVU | L0 | s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.name} {r.version} | {r.tokens_per_s:,.0f} | {r.tokens_per_s / base:.2f}× | {r.fvu:.4f} "
            f"| {r.l0:.1f} | {r.seconds:.1f} |"
        )
    report = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": [r.__dict__ for r in results],
    }
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
