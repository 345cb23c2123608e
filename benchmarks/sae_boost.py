"""SAE Boost (arXiv:2507.12990): a residual SAE for a new domain, against fine-tuning and extending the base.

For each model (MiniLM ``layers.3``, d = 384; the zoo's ``code-lm`` Llama ``layers.2``, d = 192):

* **base**: a TopK SAE (F = 4,096, k = 32) trained on the general text ``stdlib:docs`` (344,064 tokens of
  the train split: nearly all of it for MiniLM's tokenizer);
* **base + residual**: the base frozen, a residual TopK SAE (F = 1,024, k = 5, no decoder bias, reading x)
  trained on the base's error e = x − x̂_base on the domain ``stdlib:code``: ``interlayer sae boost``'s
  :func:`~interlayer.sae.boosted.boost_config` through the library's trainer;
* **fine-tuned**: every parameter of the base trained further on the domain (same tokens, the base's lr rule);
* **extended**: the base's dictionary widened by 1,024 latents trained on the domain, the old latents, their
  encoder rows and biases and b_dec frozen (their gradients zeroed, so Adam never moves them), TopK k = 32 over
  all 5,120 latents; the new latents start as a TopK SAE's do (encoder = decoder rows; started at 0.1× as a
  residual's, they never reach the top k, get no gradient, and the SAE stays the base).

Every domain arm sees the same 196,608 domain tokens, batch, seed and input normalisation. Each SAE is evaluated on
held-out tokens (the validation split) of the domain and of the general text with
:func:`interlayer.sae.evaluate.evaluate_saes`: pooled EV = 1 − Σ‖x − x̂‖²/Σ‖x − x̄‖², L0, and downstream with
the SAE spliced in: MiniLM the pooled-embedding cosine to the clean model's, the causal LM the spliced CE and
the fraction of loss recovered (CE_zero − CE_sae)/(CE_zero − CE_clean).

Targets (the paper's claims): the residual improves the domain markedly while general-domain EV stays at
≥ 99% of the base's; fine-tuning loses general EV.

    python benchmarks/sae_boost.py            # ~15 min on 2 CPU threads (builds zoo:code-lm first if needed)
    python benchmarks/sae_boost.py --quick    # smoke run, writes nothing to results
    python benchmarks/sae_boost.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from peers import cpu_model  # benchmarks/ is on sys.path when a script here runs

from interlayer.activations import ActivationCache, Chunk, ChunkPlan, cache_activations, shuffled_rows
from interlayer.models import load_model
from interlayer.sae import build_sae, load_sae, make_config, save_sae
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.boosted import boost_config
from interlayer.sae.evaluate import evaluate_saes
from interlayer.sae.io import folded_copy
from interlayer.sae.trainer import SiteTrainer, TrainConfig, train_saes

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"minilm": "layers.3", "zoo:code-lm": "layers.2"}
GENERAL, DOMAIN = "stdlib:docs", "stdlib:code"
BASE_LATENTS, BASE_K = 4096, 32
RESIDUAL_LATENTS, RESIDUAL_K = 1024, 5
MIX_CHUNKS = 4
ARMS = ("base", "base + residual", "fine-tuned", "extended")


def cached(lm, site: str, data: str, tokens: int, folder: Path) -> ActivationCache:
    return cache_activations(lm, [site], data, tokens, folder, ChunkPlan(128, 32, 8), split="train")


def chunk_stream(cache: ActivationCache, site: str, seed: int):
    def chunks(start: int) -> Iterator[Chunk]:
        return cache.chunks(start, [site], seed=seed, mix_chunks=MIX_CHUNKS)

    return chunks


def train_base(
    cache: ActivationCache, site: str, model: str, train_cfg: TrainConfig, out: Path
) -> SparseAutoencoder:
    cfg = make_config("topk", d_in=cache.width, latents=BASE_LATENTS, k=BASE_K, site=site, model=model)
    train_saes(out, chunk_stream(cache, site, train_cfg.seed), {site: cfg}, train_cfg, {"data": GENERAL})
    return load_sae(out / site)


def train_boost(cache: ActivationCache, site: str, base_folder: Path, train_cfg: TrainConfig, out: Path):
    cfg = boost_config(load_sae(base_folder), base_folder, RESIDUAL_LATENTS, RESIDUAL_K, DOMAIN)
    train_saes(out, chunk_stream(cache, site, train_cfg.seed), {site: cfg}, train_cfg, {"data": DOMAIN})
    return load_sae(out / site)


def run_steps(trainer: SiteTrainer, cache: ActivationCache, site: str, train_cfg: TrainConfig) -> None:
    """The library trainer's loop without checkpoints: same chunks, shuffle, lr schedule and step."""
    step = 0
    for chunk in chunk_stream(cache, site, train_cfg.seed)(0):
        for batch in shuffled_rows(chunk, train_cfg.batch_size, train_cfg.seed):
            lr = train_cfg.lr_for(trainer.sae.cfg.latents) * train_cfg.lr_factor(step)
            trainer.step(chunk.acts[site][batch], lr)
            step += 1
            if step >= train_cfg.steps:
                return
    raise RuntimeError(f"the domain cache ran out after {step} steps")


def fine_tune(base: SparseAutoencoder, cache: ActivationCache, site: str, train_cfg: TrainConfig):
    trainer = _copy_into(SiteTrainer(base.cfg, train_cfg, base.cfg.input_scale, torch.device("cpu")), base)
    run_steps(trainer, cache, site, train_cfg)
    return folded_copy(trainer.sae).eval()


def extend(base: SparseAutoencoder, cache: ActivationCache, site: str, train_cfg: TrainConfig):
    F = BASE_LATENTS
    cfg = replace(base.cfg, latents=F + RESIDUAL_LATENTS)
    trainer = SiteTrainer(cfg, train_cfg, base.cfg.input_scale, torch.device("cpu"))
    trainer.sae.initialise_(torch.Generator().manual_seed(train_cfg.seed))  # the new rows
    trainer = _copy_into(trainer, base)
    sae = trainer.sae
    for param in (sae.W_enc_FD, sae.b_enc_F, sae.W_dec_FD):  # old latents frozen: zero gradient rows
        param.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:F]), grad[F:]]))
    sae.b_dec_D.register_hook(torch.zeros_like)
    run_steps(trainer, cache, site, train_cfg)
    return folded_copy(sae).eval()


def _copy_into(trainer: SiteTrainer, base: SparseAutoencoder) -> SiteTrainer:
    """``trainer`` with ``base``'s weights in its first rows, in the base's training scale: the saved weights
    read raw x, training reads c·x, so the fold is undone (W_enc/c, b_dec·c, W_dec·c)."""
    base_unfolded = build_sae(base.cfg)
    base_unfolded.load_state_dict(base.state_dict())
    base_unfolded.fold_input_scale_(1 / base.cfg.input_scale)
    with torch.no_grad():
        own = dict(base_unfolded.named_parameters())
        for name, param in trainer.sae.named_parameters():
            param[: own[name].shape[0]].copy_(own[name]) if param.dim() else param.copy_(own[name])
    return trainer


def evaluate(lm, site: str, sae: SparseAutoencoder, tokens: int) -> dict[str, dict[str, float]]:
    keep = ("explained_variance", "l0", "pooled_cosine_sae", "ce_clean", "ce_sae", "frac_recovered")
    out = {}
    for name, data in (("domain", DOMAIN), ("general", GENERAL)):
        metrics = evaluate_saes(lm, {site: sae}, data, tokens, batch_size=16).metrics(site)
        out[name] = {key: float(metrics[key]) for key in keep if key in metrics}
    return out


def run_model(
    model: str, site: str, base_tokens: int, domain_tokens: int, eval_tokens: int, work: Path
) -> dict:
    lm = load_model(model)
    started = time.perf_counter()
    # each chunk's ragged end (< one batch) is left out of training: cache 25% more than is trained on
    general_cache = cached(lm, site, GENERAL, base_tokens * 5 // 4, work / "general")
    domain_cache = cached(lm, site, DOMAIN, domain_tokens * 5 // 4, work / "domain")
    base_cfg = TrainConfig(tokens=base_tokens, batch_size=2048, seed=0, dead_tokens=200_000)
    domain_cfg = replace(base_cfg, tokens=domain_tokens)
    base = train_base(general_cache, site, model, base_cfg, work / "base")
    saes = {"base": base}
    saes["base + residual"] = train_boost(
        domain_cache, site, work / "base" / site, domain_cfg, work / "boost"
    )
    saes["fine-tuned"] = fine_tune(base, domain_cache, site, domain_cfg)
    saes["extended"] = extend(base, domain_cache, site, domain_cfg)
    for arm, sae in saes.items():  # keep the SAEs beside the results of a full run
        save_sae(sae, work / "saes" / arm.replace(" + ", "_plus_").replace(" ", "_"))
    rows = {arm: evaluate(lm, site, sae.eval(), eval_tokens) for arm, sae in saes.items()}
    return {
        "site": site,
        "width": base.cfg.d_in,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "checks": checks(rows),
    }


def checks(rows: dict) -> dict[str, float | bool]:
    base, boost, tuned = rows["base"], rows["base + residual"], rows["fine-tuned"]
    ratio = boost["general"]["explained_variance"] / base["general"]["explained_variance"]
    return {
        "residual_domain_ev_gain": boost["domain"]["explained_variance"]
        - base["domain"]["explained_variance"],
        "residual_general_ev_ratio": ratio,
        "general_kept_99": ratio >= 0.99,
        "finetune_general_ev_change": tuned["general"]["explained_variance"]
        - base["general"]["explained_variance"],
    }


def table(results: dict) -> str:
    lines = []
    for model, result in results["models"].items():
        causal = "frac_recovered" in result["rows"]["base"]["domain"]
        down = ("CE", "ce_sae") if causal else ("cosine", "pooled_cosine_sae")
        lines.append(f"\n{model} {result['site']} (d = {result['width']})")
        head = f"| arm | domain EV | domain {down[0]} |"
        head += " domain loss rec. |" if causal else ""
        head += f" general EV | general {down[0]} |" + (" general loss rec. |" if causal else "")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for arm, row in result["rows"].items():
            cells = [arm]
            for part in ("domain", "general"):
                cells += [f"{row[part]['explained_variance']:.4f}", f"{row[part][down[1]]:.4f}"]
                if causal:
                    cells.append(f"{row[part]['frac_recovered']:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        c = result["checks"]
        lines.append(
            f"residual: domain EV {c['residual_domain_ev_gain']:+.4f}, general EV {c['residual_general_ev_ratio']:.2%} "
            f"of the base's; fine-tuning: general EV {c['finetune_general_ev_change']:+.4f}"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = results["models"][model]["rows"]
        for i, arm in enumerate(ARMS):  # FVU = 1 − EV, so that differences of a few points show
            fvu = [1 - rows[arm][part]["explained_variance"] for part in ("domain", "general")]
            ax.bar([j + i * 0.2 - 0.3 for j in range(2)], fvu, width=0.2, label=arm)
        ax.set_xticks([0, 1], [f"domain ({DOMAIN})", f"general ({GENERAL})"])
        ax.set_ylabel("held-out FVU = 1 − pooled EV (lower is better)")
        ax.set_title(f"{model} {results['models'][model]['site']}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the models")
    args = parser.parse_args()
    out_json, out_png = RESULTS / "sae_boost.json", RESULTS / "sae_boost.png"
    if args.plot_only:
        results = json.loads(out_json.read_text())
    else:
        torch.manual_seed(0)
        sizes = (32_768, 16_384, 4_096) if args.quick else (344_064, 196_608, 20_000)
        results = {
            "machine": {
                "cpu": cpu_model(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },  # fmt: skip
            "settings": {
                "base_tokens": sizes[0],
                "domain_tokens": sizes[1],
                "eval_tokens": sizes[2],
                "base": [BASE_LATENTS, BASE_K],
                "residual": [RESIDUAL_LATENTS, RESIDUAL_K],
            },  # fmt: skip
            "models": {},
        }
        with tempfile.TemporaryDirectory() as tmp:
            for model in args.models.split(","):
                site = MODELS[model]
                print(f"{model} {site} ...", file=sys.stderr, flush=True)
                results["models"][model] = run_model(model, site, *sizes, Path(tmp) / model.replace(":", "_"))
        if args.quick:
            print(table(results))
            return
        RESULTS.mkdir(exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out_png)
    print(table(results))


if __name__ == "__main__":
    main()
