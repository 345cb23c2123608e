"""SAE Match speed: matching two SAEs of 16,384 features each (d = 384), cost matrix and solver included.

Target (issue 9): at most 15 s on 2 cores. No library ships SAE Match, so the comparison in the same run is the
plain way of solving the same problem: the inner-product cost −U^A U^Bᵀ handed to scipy's dense
``linear_sum_assignment`` (our squared-distance cost differs from it only by per-row and per-column constants,
so both must find the same permutation; the script checks that they do). Ours: one matmul, scipy's sparse
solver on candidates, and the LP certificate of :mod:`interlayer.flow.assignment`.

Cases: "planted" (B = A's features permuted, rescaled per feature with their JumpReLU thresholds, and
perturbed with 20 % relative noise, the known-answer case) and "trained-like" (two TopK SAEs whose encoders
are noisy copies of unrelated random decoders, no structure shared: the solver's hard case).

    python benchmarks/flow.py [--latents 16384] [--d 384] [--threads 2] [--runs RUN_FOLDER]

A third case, when ``--runs`` holds a run with SAEs at layers.4 and layers.5 (benchmarks/flow_quality.py
trains one): two trained SAEs of consecutive layers.

Writes benchmarks/results/flow.json and prints the rows of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

from interlayer.flow.fold import fold_features
from interlayer.flow.match import TERMS, feature_vectors, match_features
from interlayer.sae import JumpReLUConfig, JumpReLUSAE, TopKConfig, TopKSAE


def planted(latents: int, d: int, seed: int = 0) -> tuple[JumpReLUSAE, JumpReLUSAE, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = JumpReLUSAE(JumpReLUConfig(d_in=d, latents=latents, site="layers.1"))
    a.initialise_(g)
    with torch.no_grad():
        a.W_enc_FD.add_(0.3 * a.W_enc_FD.std() * torch.randn(a.W_enc_FD.shape, generator=g))
        a.b_enc_F.copy_(0.05 * torch.randn(latents, generator=g))
        a.log_threshold_F.copy_((0.05 + 0.3 * torch.rand(latents, generator=g)).log())
    perm = torch.randperm(latents, generator=g)
    c_F = 0.5 + 1.5 * torch.rand(latents, generator=g)
    b = JumpReLUSAE(JumpReLUConfig(d_in=d, latents=latents, site="layers.2"))
    with torch.no_grad():
        b.W_enc_FD[perm] = a.W_enc_FD * c_F[:, None]
        b.b_enc_F[perm] = a.b_enc_F * c_F
        b.W_dec_FD[perm] = a.W_dec_FD / c_F[:, None]
        b.log_threshold_F[perm] = a.log_threshold_F + c_F.log()
        b.b_dec_D.copy_(a.b_dec_D)
        for p in (b.W_enc_FD, b.W_dec_FD):
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
    return a, b, perm


def unrelated(latents: int, d: int, seed: int = 1) -> tuple[TopKSAE, TopKSAE]:
    g = torch.Generator().manual_seed(seed)
    saes = []
    for site in ("layers.1", "layers.2"):
        sae = TopKSAE(TopKConfig(d_in=d, latents=latents, k=32, site=site))
        sae.initialise_(g)
        with torch.no_grad():
            sae.W_enc_FD.add_(0.5 * sae.W_enc_FD.std() * torch.randn(sae.W_enc_FD.shape, generator=g))
            sae.b_enc_F.copy_(0.05 * torch.randn(latents, generator=g))
        saes.append(sae)
    return saes[0], saes[1]


def plain(sae_a: torch.nn.Module, sae_b: torch.nn.Module, fold: str) -> tuple[torch.Tensor, float]:
    """The plain solve: the bare inner-product gain, maximised by the same scipy solver."""
    start = time.perf_counter()
    u_a = feature_vectors(fold_features(sae_a, fold), TERMS)  # type: ignore[arg-type]
    u_b = feature_vectors(fold_features(sae_b, fold), TERMS)  # type: ignore[arg-type]
    rows, cols = linear_sum_assignment((u_a @ u_b.T).double().numpy(), maximize=True)
    permutation = torch.empty(len(rows), dtype=torch.int64)
    permutation[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return permutation, time.perf_counter() - start


def timed_match(sae_a: torch.nn.Module, sae_b: torch.nn.Module, fold: str) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    match = match_features(sae_a, sae_b, fold=fold)  # type: ignore[arg-type]
    return match.permutation, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latents", type=int, default=16_384)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--runs", type=Path, default=Path("/work/flowruns/minilm"), help="Trained SAEs (optional)."
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flow.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    a, b, perm = planted(args.latents, args.d)
    ours, ours_s = timed_match(a, b, "threshold")
    base, base_s = plain(a, b, "threshold")
    rows.append(
        {
            "case": "planted (permuted, rescaled, 20% noise), JumpReLU",
            "ours_s": ours_s,
            "plain_scipy_s": base_s,
            "speedup": base_s / ours_s,
            "recovered": float((ours == perm).float().mean()),
            "same_permutation": bool(torch.equal(ours, base)),
        }
    )
    a2, b2 = unrelated(args.latents, args.d)
    ours2, ours2_s = timed_match(a2, b2, "none")
    base2, base2_s = plain(a2, b2, "none")
    rows.append(
        {
            "case": "unrelated TopK SAEs (no shared structure)",
            "ours_s": ours2_s,
            "plain_scipy_s": base2_s,
            "speedup": base2_s / ours2_s,
            "same_permutation": bool(torch.equal(ours2, base2)),
        }
    )
    if (args.runs / "layers.4").is_dir():  # trained SAEs: the realistic case (F = 4096 there)
        from interlayer.sae import load_sae

        a3, b3 = load_sae(args.runs / "layers.4"), load_sae(args.runs / "layers.5")
        ours3, ours3_s = timed_match(a3, b3, "none")
        base3, base3_s = plain(a3, b3, "none")
        rows.append(
            {
                "case": f"trained TopK SAEs, MiniLM layers.4 → layers.5 (F = {a3.cfg.latents})",
                "ours_s": ours3_s,
                "plain_scipy_s": base3_s,
                "speedup": base3_s / ours3_s,
                "same_permutation": bool(torch.equal(ours3, base3)),
            }
        )
    result = {
        "latents": args.latents,
        "d": args.d,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)".strip(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(
            f"| {row['case']} | {row['ours_s']:.1f} s | {row['plain_scipy_s']:.1f} s | {row['speedup']:.2f}× | "
            f"{row.get('recovered', float('nan')):.4f} | {row['same_permutation']} |"
        )


if __name__ == "__main__":
    main()
