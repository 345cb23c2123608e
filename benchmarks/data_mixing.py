"""Held-out FVU and dead latents of the demo's SAE training before and after data mixing, one run.

"before": interlayer at commit 3e2c267 (documents in sorted path order, shuffling only inside a chunk of
4 model batches, input scale and b_dec from that first chunk). "after": this tree (documents in the order of
the training seed, chunks mixed in windows of ``ChunkPlan.mix_chunks``); the arm "after_mix1" is the same
with ``mix_chunks=1``, to separate document shuffling from window mixing.

Each arm trains the demo's default configuration (MiniLM, stdlib:docs, 196,608 tokens, F = 4,096, k = 32,
batch 2,048, lr 3e-3, seed 0, chunks of 4 model batches of 32 contexts of 128 tokens) on ``--sites``
(default ``layers.3`` alone: all six layers take about six times as long on 2 cores) in its own
subprocess, with ``PYTHONPATH`` pointing at its tree. Every arm is evaluated on the same held-out tokens:
kept tokens of the validation split of stdlib:docs, the documents in a seeded random order (seed 1234;
files drawn from all over the library), the first ``--eval-tokens``. Metrics, per site:

    FVU = Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖²   (x̄ the mean held-out activation; pooled EV = 1 − FVU)
    dead latents = #{f : z_nf = 0 for every held-out token n}

    python benchmarks/data_mixing.py          # writes benchmarks/results/data_mixing.json

``--before DIR`` names a checkout of 3e2c267 (default: a git worktree made in a temporary folder);
``--after DIR`` a checkout of the new code (default: this repository).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _cpu() -> str:
    from peers import cpu_model  # benchmarks/ is on sys.path when a script here runs

    return cpu_model()


BEFORE_COMMIT = "3e2c267"
DEMO = {"tokens": 196_608, "latents": 4096, "k": 32, "batch_size": 2048, "lr": 3e-3, "seed": 0}
HELDOUT_SEED = 1234


def heldout(sites: str, tokens: int, out: Path) -> None:
    """Write ``tokens`` held-out activations per site (see the module docstring) to ``out``."""
    import torch

    from interlayer.atomic import write_tensors
    from interlayer.data import iter_documents, token_batches
    from interlayer.models import load_model
    from interlayer.sites import resolve_sites, run_to_sites

    lm = load_model("minilm")
    site_objs = resolve_sites(lm.model, sites)
    docs = iter_documents("stdlib:docs", split="validation", seed=HELDOUT_SEED)
    parts: dict[str, list[torch.Tensor]] = {s.name: [] for s in site_objs}
    total = 0
    with torch.no_grad():
        for batch in token_batches(lm.tokenizer, docs, 128, 32):
            if total >= tokens:
                break
            inputs = {"input_ids": batch.input_ids_BT, "attention_mask": batch.attention_mask_BT}
            for name, tensor in run_to_sites(lm.model, site_objs, **inputs).items():
                parts[name].append(tensor[batch.keep_BT].float())
            total += int(batch.keep_BT.sum())
    write_tensors(out, {name: torch.cat(p)[:tokens].contiguous() for name, p in parts.items()})


def train_and_evaluate(arm: str, sites: str, heldout_file: Path, out: Path) -> dict[str, object]:
    """Train the demo configuration with the interlayer on ``sys.path`` and evaluate on ``heldout_file``."""
    import torch

    from interlayer.activations import ChunkPlan
    from interlayer.atomic import read_tensors
    from interlayer.models import load_model
    from interlayer.sae.io import load_sae
    from interlayer.sae.trainer import TrainConfig
    from interlayer.sae.training_run import train_from_source

    if arm == "before":  # at 3e2c267 the sources lived in the sae package
        from interlayer.sae.training_run import model_source  # type: ignore[attr-defined]
    else:
        from interlayer.sources import model_source  # type: ignore[no-redef]

    lm = load_model("minilm")
    plan_kw = {"mix_chunks": 1} if arm == "after_mix1" else {}
    plan = ChunkPlan(128, batch_size=32, batches_per_chunk=4, **plan_kw)
    extra = {} if arm == "before" else {"seed": DEMO["seed"]}
    source = model_source(lm, sites, "stdlib:docs", plan, **extra)
    train_cfg = TrainConfig(
        tokens=DEMO["tokens"],
        batch_size=DEMO["batch_size"],
        lr=DEMO["lr"],
        seed=DEMO["seed"],
        checkpoint_seconds=1e9,
    )
    try:  # from the sae rewrite on, a TopK SAE has its own config class
        from interlayer.sae.topk import TopKConfig as SAEConfig  # type: ignore[attr-defined]
    except ImportError:
        from interlayer.sae.config import SAEConfig
    template = SAEConfig(d_in=source.width, latents=DEMO["latents"], k=DEMO["k"])
    started = time.perf_counter()
    metrics = train_from_source(out, source, template, train_cfg)
    seconds = time.perf_counter() - started
    data = read_tensors(heldout_file, "held-out activations")
    import interlayer

    result: dict[str, object] = {"code": interlayer.__file__, "train_seconds": round(seconds, 1), "sites": {}}
    for site in source.sites:
        sae = load_sae(out / site)
        x_ND = data[site]
        with torch.no_grad():
            x_hat_ND = torch.cat([sae(x) for x in x_ND.split(4096)])
            fired_F = torch.zeros(DEMO["latents"], dtype=torch.bool)
            for x in x_ND.split(4096):
                fired_F |= (sae.encode(x) != 0).any(0)
        x64, err64 = x_ND.double(), (x_ND - x_hat_ND).double()
        fvu = float(err64.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())
        result["sites"][site] = {  # type: ignore[index]
            "heldout_fvu": round(fvu, 4),
            "heldout_dead_latents": int((~fired_F).sum()),
            "train_fvu_ema": round(float(metrics["sites"][site]["fvu"]), 4),  # type: ignore[index]
            "input_scale": round(float(sae.cfg.input_scale), 5),
        }
    return result


def _run_child(tree: Path, args: list[str], threads: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, cwd=tree, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed in {tree}:\n{done.stderr[-4000:]}")
    return done.stdout


def _before_tree(given: str | None, scratch: Path) -> Path:
    if given:
        return Path(given)
    tree = scratch / "before"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), BEFORE_COMMIT], check=True
    )
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", default="layers.3")
    parser.add_argument("--eval-tokens", type=int, default=32_768)
    parser.add_argument("--arms", default="before,after,after_mix1")
    parser.add_argument("--before", default=None, help="a checkout of 3e2c267 (default: a new git worktree)")
    parser.add_argument("--after", default=str(REPO), help="a checkout of the new code (default: this repo)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_mixing.json"))
    parser.add_argument("--child", nargs=3, metavar=("MODE", "HELDOUT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        mode, heldout_file, out = args.child
        if mode == "heldout":
            heldout(args.sites, args.eval_tokens, Path(heldout_file))
        else:
            print(json.dumps(train_and_evaluate(mode, args.sites, Path(heldout_file), Path(out))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        after = Path(args.after)
        trees = {"after": after, "after_mix1": after}
        child = [
            "--sites",
            args.sites,
            "--eval-tokens",
            str(args.eval_tokens),
            "--threads",
            str(args.threads),
        ]
        heldout_file = scratch / "heldout.safetensors"
        _run_child(after, [*child, "--child", "heldout", str(heldout_file), "-"], args.threads)
        results: dict[str, object] = {}
        for arm in args.arms.split(","):
            tree = _before_tree(args.before, scratch) if arm == "before" else trees[arm]
            stdout = _run_child(
                tree, [*child, "--child", arm, str(heldout_file), str(scratch / arm)], args.threads
            )
            results[arm] = json.loads(stdout.strip().splitlines()[-1])
            print(arm, json.dumps(results[arm]), flush=True)
        if args.before is None and "before" in args.arms:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(scratch / "before")])

    import torch

    report = {
        "benchmark": "data_mixing",
        "config": {**DEMO, "model": "minilm", "data": "stdlib:docs", "sites": args.sites, "context_len": 128,
                   "model_batch_size": 32, "batches_per_chunk": 4},
        "heldout": {"split": "validation", "document_seed": HELDOUT_SEED, "tokens": args.eval_tokens},
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "before_commit": BEFORE_COMMIT,
        "arms": results,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
