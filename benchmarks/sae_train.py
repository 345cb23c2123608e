"""TopK SAE training throughput and held-out FVU: interlayer vs EleutherAI sparsify vs SAELens, one run.

All three train on the same cached MiniLM activations (layer 3 residual, stdlib:docs train split; held-out
tokens from the validation split), d = 384, F = 16,384, k = 32, batch 4,096, one optimiser step per batch,
each with its library's own default optimiser and learning rate. Throughput is training tokens per second of
the training loop; the machine bound is a dense [B, d] x [d, F] fp32 matrix product timed in the same run.
Also reported: our throughput as a fraction of that bound (the encoder product is the one dense matmul
of a step). Needs the bench extra: ``pip install -e '.[bench]'``.

    python benchmarks/sae_train.py            # writes benchmarks/results/sae_train.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peers import PeerResult, dense_matmul_tokens_per_s, evaluate, train_sae_lens, train_sparsify  # noqa: E402

from interlayer.activations import ActivationCache, Chunk, ChunkPlan, cache_activations  # noqa: E402
from interlayer.models import load_model  # noqa: E402
from interlayer.sae import make_config  # noqa: E402
from interlayer.sae.io import load_sae  # noqa: E402
from interlayer.sae.trainer import TrainConfig, train_saes  # noqa: E402

SITE = "layers.3"


def cached(lm, split: str, tokens: int, folder: Path) -> torch.Tensor:
    cache_activations(lm, [SITE], "stdlib:docs", tokens, folder, ChunkPlan(128, 32, 8), split=split)
    return ActivationCache(folder).site_tensor(SITE, tokens)


def train_ours(
    train_ND: torch.Tensor,
    heldout_ND: torch.Tensor,
    latents: int,
    k: int,
    batch_size: int,
    seed: int,
    lr: float | None,
    architecture: str = "topk",
) -> PeerResult:
    """Train one ``architecture`` SAE on ``train_ND`` (on its device) through ``train_saes``; the clock stops
    after a device synchronise on CUDA."""
    chunk_tokens = 16 * batch_size

    def chunks(start: int) -> Iterator[Chunk]:
        for index in range(start, train_ND.shape[0] // chunk_tokens + 1):
            rows = train_ND[index * chunk_tokens : (index + 1) * chunk_tokens]
            if rows.shape[0] >= batch_size:
                yield Chunk(index, {SITE: rows})

    tokens = (train_ND.shape[0] // batch_size) * batch_size
    cfg = TrainConfig(tokens=tokens, batch_size=batch_size, lr=lr, seed=seed, checkpoint_seconds=1e9)
    sae_cfg = make_config(architecture, d_in=train_ND.shape[1], latents=latents, k=k)
    device = str(train_ND.device)
    with tempfile.TemporaryDirectory() as out:
        if train_ND.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_saes(out, chunks, {SITE: sae_cfg}, cfg, {}, device=device)
        if train_ND.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        sae = load_sae(Path(out) / SITE, device=device)
    fvu, l0 = evaluate(lambda x: sae.reconstruct(x), heldout_ND)
    name = "interlayer" if architecture == "topk" else f"interlayer {architecture}"
    return PeerResult(name, "0.1.0", tokens, seconds, tokens / seconds, fvu, l0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40 * 4096)
    parser.add_argument("--heldout", type=int, default=16_384)
    parser.add_argument("--latents", type=int, default=16_384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr", type=float, default=None, help="interlayer's peak lr (default: the library's)"
    )
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sae_train.json"))
    args = parser.parse_args()

    lm = load_model("minilm")
    train_ND = cached(lm, "train", args.tokens, args.cache / "minilm-train")
    heldout_ND = cached(lm, "validation", args.heldout, args.cache / "minilm-validation")
    shape = (args.latents, args.k, args.batch_size, args.seed)
    bound = dense_matmul_tokens_per_s(train_ND.shape[1], args.latents, args.batch_size)
    results = [
        train_ours(train_ND, heldout_ND, *shape, args.lr),
        train_sparsify(train_ND, heldout_ND, args.latents, args.k, args.batch_size, None, args.seed),
        train_sae_lens(train_ND, heldout_ND, args.latents, args.k, args.batch_size, None, args.seed),
    ]
    bound_after = dense_matmul_tokens_per_s(train_ND.shape[1], args.latents, args.batch_size)
    ours, peers = results[0], results[1:]
    fastest = max(peers, key=lambda r: r.tokens_per_s)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "settings": vars(args) | {"cache": str(args.cache), "out": str(args.out), "d": train_ND.shape[1]},
        "matmul_bound_tokens_per_s": max(bound, bound_after),
        "results": [asdict(r) for r in results],
        "speedup_vs_fastest_peer": ours.tokens_per_s / fastest.tokens_per_s,
        "fastest_peer": fastest.name,
        "fraction_of_matmul_bound": ours.tokens_per_s / max(bound, bound_after),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(
            f"| {r.name} {r.version} | {r.tokens_per_s:,.0f} | {r.fvu:.4f} | {r.l0:.1f} | {r.seconds:.1f} |"
        )
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))


if __name__ == "__main__":
    main()
