"""Features across layers on real activations: SAE Match scores, layer skipping, feature-flow classes and
persistence (MiniLM on stdlib:docs and zoo:prose-lm), the deactivation comparison of the feature-flow paper's
Table 1 and single- against multi-layer steering (zoo:prose-lm).

SAEs: TopK (F = 4096, k = 32) at every site (``**``: embed, every residual, attention and MLP output), trained
on 300k tokens of stdlib:docs with ``interlayer sae train`` (resumable; the script trains what is missing).

    python benchmarks/flow_quality.py [--runs /work/flowruns] [--part match,deactivation,steering]

Writes benchmarks/results/flow_quality.json and prints the tables of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interlayer.flow.evaluate import model_batches, site_activations
from interlayer.flow.graph import FlowNode, flow_graph, residual_site
from interlayer.flow.run import MatchSettings, match_run
from interlayer.flow.similarity import FlowThresholds, source_sites, top_cosines
from interlayer.flow.steering import generate_ids
from interlayer.flow.summary import flow_table, persistence_curves
from interlayer.models import LoadedModel, load_model
from interlayer.sae import SparseAutoencoder, load_saes
from interlayer.sites import capture, resolve_sites

MODELS = {"minilm": "minilm", "prose-lm": "zoo:prose-lm"}
TRAIN = ["--data", "stdlib:docs", "--sites", "**", "--tokens", "300000", "--latents", "4096", "--k", "32"]
TRAIN += ["--batch-size", "2048", "--lr", "3e-3"]


def trained(runs: Path, name: str) -> dict[str, SparseAutoencoder]:
    folder = runs / name
    if not (folder / "metrics.json").exists():
        cmd = [
            sys.executable,
            "-m",
            "interlayer",
            "sae",
            "train",
            "--model",
            MODELS[name],
            *TRAIN,
            "--out",
            str(folder),
        ]
        subprocess.run(cmd, check=True)
    return load_saes(folder)


# ---- A. SAE Match and feature flow on real activations ---------------------------------------------------
def match_part(runs: Path, name: str) -> dict[str, Any]:
    saes = trained(runs, name)
    lm = load_model(MODELS[name])
    settings = MatchSettings(data="stdlib:docs", tokens=20_000, skip_tokens=4_000)
    started = time.perf_counter()
    summary = match_run(saes, runs / f"{name}-match", settings, lm)
    thresholds = FlowThresholds()
    return {
        "pairs": summary["pairs"],
        "compositions": summary["compositions"],
        "classes": flow_table(saes, thresholds),
        "persistence": persistence_curves(saes, thresholds),
        "seconds": time.perf_counter() - started,
    }


@torch.no_grad()
def strata_part(runs: Path, name: str, layer: int = 2) -> list[dict[str, Any]]:
    """s(R) of the residual SAE at ``layer`` against ``layer``−1 by firing-frequency rank (8k tokens)."""
    saes = trained(runs, name)
    lm = load_model(MODELS[name])
    here, before = residual_site(layer), residual_site(layer - 1)
    acts = site_activations(lm, [before, here], "stdlib:docs", 8_000)
    freq_F = (saes[here].encode(acts[here]) > 0).float().mean(0)
    s_F = top_cosines(saes[here].W_dec_FD, saes[before].W_dec_FD)[0][:, 0]
    order = freq_F.argsort(descending=True)
    rows = []
    for lo, hi in ((0, 100), (100, 500), (500, 2000), (2000, saes[here].cfg.latents)):
        idx = order[lo:hi]
        rows.append(
            {
                "ranks": f"{lo + 1}-{hi}",
                "mean_frequency": float(freq_F[idx].mean()),
                "mean_s_R": float(s_F[idx].mean()),
                "share_at_least_0.5": float((s_F[idx] >= 0.5).float().mean()),
            }
        )
    return rows


# ---- B. Deactivation (Table 1 of arXiv:2502.03032) ---------------------------------------------------------
@dataclass(frozen=True)
class Captured:
    """A model batch with the activations of every site on it."""

    inputs: dict[str, torch.Tensor]
    keep_BT: torch.Tensor
    acts: dict[str, torch.Tensor]


def _top_rows(z_rows_RF: torch.Tensor, feature: int, n: int = 8) -> list[int]:
    """The ``n`` context rows where ``feature``'s largest activation is highest (those where it fires)."""
    best = z_rows_RF[:, feature]
    top = best.topk(min(n, best.numel()))
    return top.indices[top.values > 0].tolist()


@torch.no_grad()
def _activation(
    lm: LoadedModel, sae: SparseAutoencoder, site: str, inputs: dict[str, torch.Tensor], feature: int
) -> torch.Tensor:
    with capture(lm.model, resolve_sites(lm.model, site)) as acts:
        lm.model(**inputs)
    return sae.encode(acts[site])[..., feature]


@torch.no_grad()
def _change(
    lm: LoadedModel,
    saes: dict[str, SparseAutoencoder],
    target: tuple[str, int],
    source: tuple[str, int],
    inputs: dict[str, torch.Tensor],
    active: torch.Tensor,
    before: float,
) -> float:
    """1 − Σ a'/Σ a over the target's active tokens, a' its activation with the source feature deactivated."""
    from interlayer.flow.interventions import rescale

    site, feature = target
    with rescale(lm.model, saes[source[0]], source[0], source[1], 0.0):
        after = _activation(lm, saes[site], site, inputs, feature)[active].clamp_min(0).sum()
    return float(1 - after / before)


@torch.no_grad()
def _standardised(z_NF: torch.Tensor) -> torch.Tensor:
    """Columns centred and scaled to unit norm (Pearson correlation is then a dot product)."""
    zc = z_NF.double() - z_NF.double().mean(0)
    return zc / zc.norm(dim=0).clamp_min(1e-12)


def deactivation_part(
    runs: Path, targets_per_layer: int = 60, candidates: int = 5, frequent_features: int = 500
) -> dict[str, Any]:
    """For targets f (drawn among the ``frequent_features`` most frequent features of each residual layer: the
    rarer ones of these short runs are still close to their random initialisation), the predecessor chosen by each method is deactivated (r = 0 at
    its site) and f's activation is re-measured on its top contexts at the tokens where it was active:
    change = 1 − Σ a' / Σ a (a' clamped at 0); success = change ≥ 0.5."""
    saes = trained(runs, "prose-lm")
    lm = load_model(MODELS["prose-lm"])
    sites = resolve_sites(lm.model, list(saes))
    batches = []
    for batch in model_batches(lm, "stdlib:docs", 12_000, context_len=128, batch_size=16):
        with torch.no_grad(), capture(lm.model, sites) as acts:
            lm.model(**batch.inputs)
        batches.append(Captured(batch.inputs, batch.keep_BT, {k: v.float() for k, v in acts.items()}))
    generator = torch.Generator().manual_seed(0)
    results: dict[str, list[float]] = {
        "top-1 cosine": [],
        "activation correlation": [],
        "exhaustive search": [],
    }
    layers = sorted(int(s.split(".")[1]) for s in saes if s.count(".") == 1 and s.startswith("layers."))
    inputs_all = {k: torch.cat([b.inputs[k] for b in batches]) for k in ("input_ids", "attention_mask")}
    keep_all = torch.cat([b.keep_BT for b in batches])
    for layer in layers:
        site = residual_site(layer)
        sources = {k: v for k, v in source_sites(layer).items() if v in saes}
        with torch.no_grad():
            z_BTF = torch.cat([saes[site].encode(b.acts[site]) for b in batches]) * keep_all[..., None]
            z_kept_NF = z_BTF[keep_all]
            source_NF = {
                k: _standardised(torch.cat([saes[src].encode(b.acts[src][b.keep_BT]) for b in batches]))
                for k, src in sources.items()
            }
        fires_F = (z_kept_NF > 0).sum(0)
        frequent = fires_F.argsort(descending=True)[:frequent_features]  # the well-trained ones
        alive = frequent[fires_F[frequent] >= 20]
        chosen = alive[torch.randperm(alive.numel(), generator=generator)[:targets_per_layer]].tolist()
        target_NT = _standardised(z_kept_NF[:, chosen])
        z_rows_RF = z_BTF.amax(1)
        for j, feature in enumerate(chosen):
            rows = _top_rows(z_rows_RF, feature)
            if not rows:
                continue
            inputs = {k: v[rows] for k, v in inputs_all.items()}
            active = (z_BTF[rows, :, feature] > 0) & keep_all[rows]
            before = float(z_BTF[rows, :, feature][active].sum())
            row = saes[site].W_dec_FD[feature : feature + 1]
            cos = {k: top_cosines(row, saes[src].W_dec_FD, candidates) for k, src in sources.items()}
            corr = {k: z.T @ target_NT[:, j] for k, z in source_NF.items()}
            best_cos = max(sources, key=lambda k: float(cos[k][0][0, 0]))
            best_corr = max(sources, key=lambda k: float(corr[k].max()))
            by_cos = (sources[best_cos], int(cos[best_cos][1][0, 0]))
            by_corr = (sources[best_corr], int(corr[best_corr].argmax()))
            pool = {(sources[k], int(i)) for k in sources for i in cos[k][1][0].tolist()}
            pool |= {(sources[k], int(i)) for k in sources for i in corr[k].topk(candidates).indices.tolist()}
            changes = {
                cand: _change(lm, saes, (site, feature), cand, inputs, active, before) for cand in pool
            }
            results["top-1 cosine"].append(changes[by_cos])
            results["activation correlation"].append(changes[by_corr])
            results["exhaustive search"].append(max(changes.values()))
    return {
        method: {
            "targets": len(values),
            "mean_activation_change": sum(values) / len(values),
            "success_rate": sum(v >= 0.5 for v in values) / len(values),
        }
        for method, values in results.items()
    }


# ---- C. Single- against multi-layer steering ---------------------------------------------------------------
PROMPTS = [
    "The function",
    "This module provides",
    "Return the",
    "If the value is",
    "The default is",
    "A list of",
    "When the file",
    "This class",
]


@torch.no_grad()
def _perplexity(lm: LoadedModel, prompt: str, continuation: list[int]) -> float:
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    full = torch.cat([ids, torch.tensor([continuation])], dim=1)
    logp = lm.model(input_ids=full).logits[0, :-1].log_softmax(-1)
    nll = -logp[torch.arange(full.shape[1] - 1), full[0, 1:]][ids.shape[1] - 1 :]
    return float(nll.mean().exp())


def steering_part(runs: Path, features: int = 16, new_tokens: int = 24) -> dict[str, Any]:
    """For features of the prose LM's residual SAE at layer 2 whose topic is a set of tokens (the 5 token ids
    on which the feature fires most often), steer at equal total strength s: at its own layer alone, or
    spread with a constant schedule over its flow graph's residual chain (one node per layer, s/n each).
    Topic: the tokens on which the feature fires on at least half of their occurrences (its 5 most frequent);
    a feature qualifies when its topic covers half its firings and its flow graph's chain spans at least two
    layers. Topic hit = a topic token appears in the greedy continuation; perplexity under the unsteered
    model; strength 0 is the unsteered baseline."""
    from interlayer.flow.interventions import SteeringTerm, feature_direction, layer_strengths

    saes = trained(runs, "prose-lm")
    lm = load_model(MODELS["prose-lm"])
    layer = 2
    site = residual_site(layer)
    batches = list(model_batches(lm, "stdlib:docs", 12_000, context_len=128, batch_size=16))
    counts = torch.zeros(saes[site].cfg.latents, lm.model.config.vocab_size)
    occurrences = torch.zeros(lm.model.config.vocab_size)
    norms = []
    for batch in batches:
        with capture(lm.model, resolve_sites(lm.model, site)) as acts:
            lm.model(**batch.inputs)
        x = acts[site][batch.keep_BT]
        norms.append(x.norm(dim=-1))
        fired = (saes[site].encode(x) > 0).float()
        counts.index_add_(1, batch.inputs["input_ids"][batch.keep_BT], fired.T)
        occurrences += torch.bincount(batch.inputs["input_ids"][batch.keep_BT], minlength=occurrences.numel())
    median_norm = float(torch.cat(norms).median())
    specific = counts * (
        counts >= 0.5 * occurrences
    )  # tokens on which the feature fires at least half the time
    topics = specific.topk(5, dim=1)
    coverage = topics.values.sum(1) / counts.sum(1).clamp_min(1)
    candidates = ((counts.sum(1) >= 30) & (coverage >= 0.5)).nonzero().squeeze(1).tolist()
    chosen, chains = [], {}
    for feature in candidates:
        chain = [n for n in flow_graph(saes, FlowNode(site, feature)).residual_chain() if n.layer >= 0]
        if len({n.layer for n in chain}) >= 2 and len(chosen) < features:
            chosen.append(feature)
            chains[feature] = chain
    rows = []
    for scale in (0.0, 0.25, 0.5, 1.0):
        strength = scale * median_norm
        stats = {"single": [0, 0.0, 0], "multi": [0, 0.0, 0]}
        for feature in chosen:
            topic = {
                int(t) for t, v in zip(topics.indices[feature], topics.values[feature], strict=True) if v > 0
            }
            chain = chains[feature]
            per_layer = layer_strengths(strength, list(range(len(chain))), "constant", total=True)
            plans = {
                "single": [SteeringTerm(site, feature_direction(saes[site], feature), strength)],
                "multi": [
                    SteeringTerm(n.site, feature_direction(saes[n.site], n.feature), s)
                    for n, s in zip(chain, per_layer, strict=True)
                ],
            }
            for name, terms in plans.items():
                for prompt in PROMPTS:
                    tokens = generate_ids(lm, prompt, terms, new_tokens)
                    stats[name][0] += bool(topic & set(tokens))
                    stats[name][1] += math.log(_perplexity(lm, prompt, tokens))
                    stats[name][2] += 1
        for name, (hits, log_ppl, n) in stats.items():
            rows.append(
                {
                    "strength / median norm": scale,
                    "steering": name,
                    "topic_rate": hits / n,
                    "perplexity": math.exp(log_ppl / n),
                }
            )
    base = [generate_ids(lm, p, [], new_tokens) for p in PROMPTS]
    baseline_ppl = math.exp(
        sum(math.log(_perplexity(lm, p, t)) for p, t in zip(PROMPTS, base, strict=True)) / len(PROMPTS)
    )
    return {
        "features": chosen,
        "chain_layers": [len({n.layer for n in chains[f]}) for f in chosen],
        "median_norm": median_norm,
        "rows": rows,
        "unsteered_perplexity": baseline_ppl,
    }


def markdown(result: dict[str, Any]) -> str:
    """The tables of BENCHMARKS.md from the results."""
    lines = []
    for key in [k for k in result if k.startswith("match:")]:
        part = result[key]
        lines += [
            f"\n**{key[6:]}**: SAE Match between consecutive layers (20k validation tokens; layer skipping 4k)\n"
        ]
        lines += [
            "| pair | folded MSE (median) | matching score | random | EV permuted | EV drop layer | EV SAE at t | ΔCE or pooled cos: permuted / drop / SAE at t |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for row in part["pairs"]:
            skip = row.get("layer_skipping", {})
            down = ""
            if skip:
                key2 = "delta_ce" if "delta_ce" in skip["permuted"] else "pooled_cosine"
                down = (
                    " / ".join(f"{skip[v][key2]:.3f}" for v in ("permuted", "drop_layer", "sae_at_t"))
                    + f" ({key2})"
                )
            ev = [f"{skip[v]['ev']:.3f}" if skip else "" for v in ("permuted", "drop_layer", "sae_at_t")]
            lines.append(
                f"| {row['site_a']} → {row['site_b']} | {row['folded_mse_median']:.4f} | {row.get('matching_score', float('nan')):.3f} | "
                f"{row.get('random_score', float('nan')):.4f} | {' | '.join(ev)} | {down} |"
            )
        by_distance: dict[int, list[float]] = {}
        for c in part["compositions"]:
            if c["site_a"] != "embed":
                by_distance.setdefault(c["distance"], []).append(c["matching_score"])
        lines += ["", "Composed permutations (start layers ≥ 0): mean matching score by layers apart: "]
        lines += [", ".join(f"{d}: {sum(v) / len(v):.3f}" for d, v in sorted(by_distance.items()))]
        lines += [
            "",
            "| layer | translated | processed | born | unexplained | mean s(R) | chance s(R) | mean s(mlp) | chance s(mlp) | mean s(attn) | chance s(attn) |",
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in part["classes"]:
            cells = [
                f"{row.get(c, float('nan')):.3f}" for c in ("translated", "processed", "born", "unexplained")
            ]
            for kind in ("residual", "mlp", "attn"):
                cells += [
                    f"{row.get(f'mean s({kind})', float('nan')):.3f}",
                    f"{row.get(f'chance s({kind})', float('nan')):.3f}",
                ]
            lines.append(f"| {row['site']} | " + " | ".join(cells) + " |")
        lines += ["", "Persistence (fraction still matched at cosine ≥ 0.5, by layers ahead): "]
        lines += [
            "; ".join(
                f"from {site}: " + ", ".join(f"{v:.3f}" for v in curve)
                for site, curve in part["persistence"].items()
            )
        ]
    for key in [k for k in result if k.startswith("strata:")]:
        lines += [
            "",
            f"{key[7:]}: s(R) at layers.2 by frequency rank: "
            + "; ".join(
                f"{r['ranks']}: freq {r['mean_frequency']:.4f}, mean {r['mean_s_R']:.2f}, ≥ 0.5 {r['share_at_least_0.5']:.1%}"
                for r in result[key]
            ),
        ]
    if "deactivation" in result:
        lines += [
            "",
            "| method | targets | mean activation change | success rate (change ≥ 0.5) |",
            "|---|---|---|---|",
        ]
        for method, row in result["deactivation"].items():
            lines.append(
                f"| {method} | {row['targets']} | {row['mean_activation_change']:.3f} | {row['success_rate']:.1%} |"
            )
    if "steering" in result:
        st = result["steering"]
        lines += [
            "",
            f"Steering ({len(st['features'])} features; their chains span "
            f"{sum(st['chain_layers']) / max(len(st['chain_layers']), 1):.1f} layers on average)",
            "",
        ]
        lines += ["| strength / median norm | steering | topic rate | perplexity |", "|---|---|---|---|"]
        for row in st["rows"]:
            lines.append(
                f"| {row['strength / median norm']} | {row['steering']} | {row['topic_rate']:.1%} | {row['perplexity']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, default=Path("/work/flowruns"))
    parser.add_argument(
        "--part", default="match,deactivation,steering", help="Parts to run ('' prints the tables)."
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flow_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    parts = args.part.split(",")
    if "match" in parts:
        for name in MODELS:
            result[f"match:{name}"] = match_part(args.runs, name)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "strata" in parts:
        for name in MODELS:
            result[f"strata:{name}"] = strata_part(args.runs, name)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "deactivation" in parts:
        result["deactivation"] = deactivation_part(args.runs)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "steering" in parts:
        result["steering"] = steering_part(args.runs)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
