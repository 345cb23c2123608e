"""``interlayer demo``: the main job on the embedded default, as a list of stages feeding one report.

Each stage is a function ``(DemoContext) -> list[Section]``; adding a capability to the demo means writing one
such function and appending it to :data:`STAGES`. The model is loaded once and shared.

Stage "budgets": one HierarchicalTopK SAE on the last site against that site's TopK SAE, at k/4, k/2 and k.

Stage "flow": TopK SAEs at the attention and MLP outputs of the same layers too; SAE Match between consecutive layers of each
kind (permutations, matching scores, layer skipping); the classes of every residual feature; flow graphs of a
few features (the most persistent and the most clearly born in a module at the last layer) with their top
contexts; persistence over depth.

Stage "steering" (opt-in: ``--stages sae,budgets,flow,steering``): all-layer steering vectors trained with RLOO
on zoo:arith-lm, greedy and sampled accuracy against the base model, and the analyses of
:mod:`interlayer.steering.analysis`.

Stage "diffusion" (opt-in: ``--stages sae,budgets,flow,diffusion``): zoo:code-mdlm (built on first use, about 12
minutes), a one-block G-Star remasker trained for it, and samples side by side from MDLM, ReMDM-cap, Star+ and
G-Star at 16 steps, the tokens the remasker flags as errors highlighted, with their generative perplexity under
zoo:code-lm, entropy and valid-Python fraction.

Stage "lime" (opt-in: ``--stages sae,budgets,flow,lime``): LIMe and the Llama baseline (4 layers, d = 64) trained
from the same weights on the same ``stdlib:code`` batches with zoo:code-lm's tokenizer (built on first use), their
loss curves, the value entropy per layer of both, and which earlier layers LIMe's routers read.

Stage "varan" (opt-in: ``--stages sae,budgets,flow,varan``): zoo:speech-w2v2 (a small wav2vec2 pretrained here on
synthesised speech, built on first use) fine-tuned with LoRA on ``synth:styles`` (four speaking styles spoken by
eSpeak NG) with VARAN's per-layer heads and with the last layer alone, the same steps and batches: test accuracy
of both and VARAN's posterior over layers.

Stage "sae": capture every residual layer of MiniLM on ``stdlib:docs``, train a TopK SAE per layer from one
forward pass per batch, evaluate on the validation split (pooled EV, L0, dead/dense latents, the pooled-output
cosine with the SAE spliced in), sweep k at inference for an EV-vs-L0 plot, and show feature cards with each
sampled latent's top-activating contexts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import torch

from interlayer.activations import ChunkPlan, model_chunks
from interlayer.atomic import write_json
from interlayer.data import display_tokens
from interlayer.errors import UserError
from interlayer.models import LoadedModel, load_model
from interlayer.progress import progress_bar
from interlayer.report import (
    ContextExample,
    FeatureCard,
    Section,
    feature_cards_html,
    line_plot_svg,
    metrics_table,
    write_report,
)
from interlayer.sae.architectures import make_config
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.config import SAEConfig
from interlayer.sae.evaluate import Evaluation, evaluate_saes, reconstruction_sweep
from interlayer.sae.io import load_sae
from interlayer.sae.topk import TopKConfig
from interlayer.sae.trainer import TrainConfig
from interlayer.sae.training_run import train_from_source
from interlayer.sites import resolve_sites
from interlayer.sources import model_source


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings; :meth:`preset` gives the quick and the default run."""

    out: Path
    """Output folder: report.html, summary.json, saes/."""
    tokens: int
    """Training tokens per SAE."""
    latents: int
    """Dictionary size per SAE."""
    k: int
    """Active latents per token."""
    batch_size: int
    """Tokens per SAE optimiser step."""
    eval_tokens: int
    """Validation tokens for the metrics."""
    model: str = "minilm"
    data: str = "stdlib:docs"
    sites: str = "layers.*"
    context_len: int = 128
    lr: float = 3e-3
    """Peak learning rate: lower than the library default so these short runs keep few dead latents."""
    cards_per_site: int = 4
    """Feature cards sampled per layer (among latents that fired)."""
    flow_graphs: int = 3
    """Flow graphs drawn (roots picked at the last residual layer)."""
    seed: int = 0
    stages: tuple[str, ...] = ("sae", "budgets", "flow")
    """The stages run, in order (:data:`STAGES`); ``steering`` is opt-in (it builds zoo:arith-lm, about 9
    minutes once, and trains vectors with RL)."""
    steering_steps: int = 30
    """RL updates of the steering stage (8 prompts × 8 samples each)."""
    steering_problems: int = 100
    """Held-out problems of the steering stage's evaluation."""
    remasker_steps: int = 150
    """Training steps of the diffusion stage's one-block remasker."""
    diffusion_samples: int = 32
    """Samples per sampler scored in the diffusion stage (the first 3 are shown)."""
    lime_steps: int = 300
    """Training steps of each model of the LIMe stage (16 contexts of 64 tokens per step)."""
    varan_steps: int = 150
    """Fine-tuning steps of each run of the VARAN stage (16 clips per step)."""
    speech_model: str = "zoo:speech-w2v2"
    """The speech encoder of the VARAN stage."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.stages if name not in dict(STAGES)]
        if unknown or not self.stages:
            raise UserError(
                f"unknown demo stage {unknown[0] if unknown else '(none)'}; stages: {', '.join(dict(STAGES))}"
            )
        needs_sae = {"budgets", "flow"} & set(self.stages)
        if needs_sae and "sae" not in self.stages:
            raise UserError(f"the demo stages {', '.join(sorted(needs_sae))} need the sae stage")

    @classmethod
    def preset(
        cls, quick: bool, out: Path, stages: tuple[str, ...] = ("sae", "budgets", "flow")
    ) -> DemoConfig:
        if quick:
            return cls(
                out=out, tokens=49_152, latents=2048, k=16, batch_size=1024, eval_tokens=4_000, stages=stages,
                steering_steps=10, remasker_steps=40, diffusion_samples=8, lime_steps=60, varan_steps=30,
            )  # fmt: skip
        return cls(
            out=out, tokens=196_608, latents=4096, k=32, batch_size=2048, eval_tokens=8_000, stages=stages
        )


@dataclass
class DemoContext:
    """What stages share: the settings, the loaded model, and the summary they add to."""

    cfg: DemoConfig
    lm: LoadedModel
    summary: dict[str, Any] = field(default_factory=dict)


def _train(ctx: DemoContext, sites: str, template: SAEConfig, run_dir: Path) -> dict[str, SparseAutoencoder]:
    """Train one SAE shaped like ``template`` per site of ``sites`` with the demo's settings; load them."""
    cfg = ctx.cfg
    source = model_source(ctx.lm, sites, cfg.data, _plan(cfg), seed=cfg.seed)
    train_cfg = TrainConfig(
        tokens=cfg.tokens, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, checkpoint_seconds=60
    )
    with progress_bar(f"training {len(source.sites)} {template.architecture} SAE(s)", train_cfg.steps) as bar:
        train_from_source(run_dir, source, template, train_cfg, on_step=lambda step, _s: bar.show(step))
    return {site: load_sae(run_dir / site) for site in source.sites}


def _plan(cfg: DemoConfig) -> ChunkPlan:
    return ChunkPlan(cfg.context_len, batch_size=32, batches_per_chunk=4)


def sae_stage(ctx: DemoContext) -> list[Section]:
    cfg, lm = ctx.cfg, ctx.lm
    plan = _plan(cfg)
    saes = _train(ctx, cfg.sites, TopKConfig(d_in=1, latents=cfg.latents, k=cfg.k), cfg.out / "saes")
    with progress_bar("evaluating", cfg.eval_tokens) as bar:
        evaluation = evaluate_saes(
            lm, saes, cfg.data, cfg.eval_tokens, cfg.context_len, 16, on_batch=bar.advance
        )
    rows = [{"site": site, **evaluation.metrics(site)} for site in saes]
    ctx.summary["sae"] = {row["site"]: {k: v for k, v in row.items() if k != "site"} for row in rows}
    columns = [
        "site",
        "explained_variance",
        "ev_legacy_per_token",
        "l0",
        "dead_latents",
        "dense_latents",
    ]
    columns += [c for c in rows[0] if c.startswith(("pooled_", "ce_", "delta_", "frac_", "kl_"))]
    intro = (
        f"<p>One TopK SAE per layer of <code>{escape(cfg.model)}</code> (F = {cfg.latents}, k = {cfg.k}), trained on "
        f"{cfg.tokens:,} tokens of <code>{escape(cfg.data)}</code> and evaluated on {cfg.eval_tokens:,} held-out tokens. "
        "EV is pooled over the whole evaluation set; special tokens are excluded.</p>"
    )
    return [
        Section("SAE metrics per layer", intro + metrics_table(rows, columns)),
        Section("Explained variance against L0", _sweep_plot(lm, saes, cfg, plan)),
        Section("Feature cards", feature_cards_html(_cards(lm, saes, evaluation, cfg))),
    ]


def _sweep_plot(lm: LoadedModel, saes: dict[str, SparseAutoencoder], cfg: DemoConfig, plan: ChunkPlan) -> str:
    """EV vs L0 when each SAE keeps k' ∈ {k/4, k/2, k, 2k, 4k} latents at inference, on one validation chunk."""
    chunk = next(model_chunks(lm, resolve_sites(lm.model, list(saes)), cfg.data, plan, split="validation"))
    ks = sorted(
        {
            max(1, cfg.k // 4),
            max(1, cfg.k // 2),
            cfg.k,
            min(cfg.latents, 2 * cfg.k),
            min(cfg.latents, 4 * cfg.k),
        }
    )
    with torch.no_grad():
        series = {site: reconstruction_sweep(sae, chunk.acts[site], ks) for site, sae in saes.items()}
    note = f"<p>Each SAE was trained at k = {cfg.k}; points keep the top k′ ∈ {ks} latents at inference.</p>"
    return note + line_plot_svg(
        series, "L0 (active latents per token)", "explained variance (pooled)", log_x=True
    )


def _cards(
    lm: LoadedModel, saes: dict[str, SparseAutoencoder], evaluation: Evaluation, cfg: DemoConfig
) -> list[FeatureCard]:
    generator = torch.Generator().manual_seed(cfg.seed)
    cards = []
    for site in saes:
        result = evaluation.sites[site]
        freq_F = result.reconstruction.frequencies_F
        alive = (freq_F > 0).nonzero().squeeze(1)
        for feature in alive[
            torch.randperm(alive.numel(), generator=generator)[: cfg.cards_per_site]
        ].tolist():
            examples = []
            for value, context, position in result.contexts.examples(feature):
                lo, hi = max(0, position - 10), position + 5
                ids = evaluation.input_ids_CT[context, lo:hi].tolist()
                examples.append(ContextExample(display_tokens(lm.tokenizer, ids), position - lo, value))
            mean_act = float(result.reconstruction.mean_active_F[feature])
            cards.append(FeatureCard(site, feature, float(freq_F[feature]), mean_act, tuple(examples)))
    return cards


def budgets_stage(ctx: DemoContext) -> list[Section]:
    """One HierarchicalTopK SAE (K = k) on the last site, against that site's TopK SAE from the "sae" stage,
    both evaluated at k/4, k/2 and k on one validation chunk."""
    cfg, lm = ctx.cfg, ctx.lm
    site = resolve_sites(lm.model, cfg.sites)[-1].name
    hierarchical = _train(
        ctx, site, make_config("hierarchical", d_in=1, latents=cfg.latents, k=cfg.k), cfg.out / "hierarchical"
    )[site]
    topk = load_sae(cfg.out / "saes" / site)
    x_ND = next(
        model_chunks(lm, resolve_sites(lm.model, site), cfg.data, _plan(cfg), split="validation")
    ).acts[site]
    ks = sorted({max(1, cfg.k // 4), max(1, cfg.k // 2), cfg.k})
    with torch.no_grad():
        series = {
            f"HierarchicalTopK, one SAE (K = {cfg.k})": reconstruction_sweep(hierarchical, x_ND, ks),
            f"TopK trained at k = {cfg.k}": reconstruction_sweep(topk, x_ND, ks),
        }
    ctx.summary["budgets"] = {
        "site": site,
        "ks": ks,
        "hierarchical_ev": [ev for _, ev in series[f"HierarchicalTopK, one SAE (K = {cfg.k})"]],
        "topk_ev": [ev for _, ev in series[f"TopK trained at k = {cfg.k}"]],
    }
    rows = [
        {"k": k, "hierarchical EV": h, f"topk (k = {cfg.k}) EV": t}
        for k, h, t in zip(
            ks, ctx.summary["budgets"]["hierarchical_ev"], ctx.summary["budgets"]["topk_ev"], strict=True
        )
    ]
    intro = (
        f"<p>A HierarchicalTopK SAE is trained once for every budget k ≤ {cfg.k} (the loss averages the "
        f"reconstruction of every prefix of its sorted latents); a TopK SAE is trained for k = {cfg.k} only. "
        f"Both are evaluated keeping their top k latents on {x_ND.shape[0]:,} validation tokens of "
        f"<code>{escape(site)}</code>, same width, tokens and settings.</p>"
    )
    plot = line_plot_svg(series, "L0 (active latents per token)", "explained variance (pooled)", log_x=True)
    return [Section("One SAE for every sparsity budget", intro + metrics_table(rows, list(rows[0])) + plot)]


def flow_stage(ctx: DemoContext) -> list[Section]:
    """Module SAEs, SAE Match and feature flow over the "sae" stage's residual SAEs."""
    from interlayer.flow.contexts import feature_cards
    from interlayer.flow.evaluate import consecutive_pairs
    from interlayer.flow.graph import flow_graph, pick_roots
    from interlayer.flow.report import flow_sections, match_section
    from interlayer.flow.run import MatchSettings, match_run
    from interlayer.flow.similarity import FlowThresholds

    cfg, lm = ctx.cfg, ctx.lm
    residual = resolve_sites(lm.model, cfg.sites)
    module_sites = ",".join(
        f"layers.{site.layer}.attn,layers.{site.layer}.mlp" for site in residual if site.layer >= 0
    )
    modules = _train(
        ctx, module_sites, TopKConfig(d_in=1, latents=cfg.latents, k=cfg.k), cfg.out / "module_saes"
    )
    saes = {site.name: load_sae(cfg.out / "saes" / site.name) for site in residual}
    saes |= modules
    settings = MatchSettings(data=cfg.data, tokens=cfg.eval_tokens, skip_tokens=cfg.eval_tokens // 4)
    pairs = consecutive_pairs(list(saes))
    matched: dict[str, Any] = {"pairs": [], "compositions": []}
    if pairs:  # a demo on one layer has none
        with progress_bar("SAE Match", len(pairs)) as bar:
            matched = match_run(
                saes, cfg.out / "flow" / "match", settings, lm, on_pair=lambda _a, _b: bar.advance(1)
            )
    thresholds = FlowThresholds()
    graphs = [flow_graph(saes, root, thresholds) for root in pick_roots(saes, thresholds, cfg.flow_graphs)]
    nodes = [(n.site, n.feature) for g in graphs for n in g.nodes.values()]
    cards = feature_cards(lm, saes, nodes, cfg.data, cfg.eval_tokens, context_len=cfg.context_len)
    sections, shown = flow_sections(saes, graphs, thresholds, cards)
    ctx.summary["flow"] = {"match": matched, "graphs": [g.to_json() for g in graphs]} | shown
    return [*sections, match_section(matched)] if pairs else sections


def steering_stage(ctx: DemoContext) -> list[Section]:
    """All-layer steering vectors trained with RLOO on zoo:arith-lm, their accuracy against the base model,
    and what they do (logit lens, persistence, token substitution, path patching)."""
    from interlayer.steering.analysis_run import analyze
    from interlayer.steering.evaluate import evaluate
    from interlayer.steering.tasks import load_task
    from interlayer.steering.trainer import RLConfig, train_rl
    from interlayer.steering.vectors import SteeringVectors

    cfg = ctx.cfg
    lm = load_model("zoo:arith-lm")
    task = load_task("arith", train=2000, validation=0, test=cfg.steering_problems, seed=cfg.seed)
    rl = RLConfig(
        mode="vectors",
        lr=1e-2,
        steps=cfg.steering_steps,
        prompts_per_step=8,
        samples_per_prompt=8,
        seed=cfg.seed,
    )
    run = cfg.out / "steering"
    summary = train_rl(lm.model, lm.tokenizer, task, rl, run, model_name="zoo:arith-lm")
    vectors = SteeringVectors.load(run / "vectors", lm.model)
    test = task.problems["test"]
    rows = []
    for name, v in (("base", None), ("all-layer vectors", vectors)):
        result = evaluate(lm.model, lm.tokenizer, test, task.verifier, task.max_new_tokens, v, samples=4)
        rows.append(
            {
                "model": name,
                "greedy accuracy": result.accuracy,
                "95% interval": f"[{result.ci_low:.3f}, {result.ci_high:.3f}]",
                "sampled accuracy (G = 4)": result.sampled_accuracy,
            }
        )
    sections, results = analyze(lm.model, lm.tokenizer, vectors, task, problems=32, model_name="zoo:arith-lm")
    ctx.summary["steering"] = {"train": summary, "accuracy": rows, "analysis": results}
    intro = (
        f"<p>{summary['trainable_parameters']} numbers (one vector per layer of zoo:arith-lm) trained with RLOO "
        f"for {summary['steps']} steps of 8 arithmetic word problems × 8 samples; accuracy on "
        f"{len(test)} held-out problems, greedy and sampled at temperature 1.</p>"
    )
    return [Section("Steering vectors trained with RL", intro + metrics_table(rows)), *sections]


def diffusion_stage(ctx: DemoContext) -> list[Section]:
    """Samplers side by side on zoo:code-mdlm at 16 steps, the remasker's flagged errors highlighted."""
    import torch

    from interlayer.diffusion.denoiser import load_denoiser
    from interlayer.diffusion.evaluate import cell_metrics
    from interlayer.diffusion.remasker import RemaskerConfig, load_remasker
    from interlayer.diffusion.report import shown_samples, side_by_side_html
    from interlayer.diffusion.samplers import SamplerConfig, sample
    from interlayer.diffusion.templates import build_templates
    from interlayer.diffusion.train import train_remasker

    cfg = ctx.cfg
    denoiser, tokenizer = load_denoiser("zoo:code-mdlm")
    run = cfg.out / "diffusion" / f"remasker-{cfg.remasker_steps}"
    rcfg = RemaskerConfig(
        init="first",
        layers=1,
        steps=cfg.remasker_steps,
        eval_every=cfg.remasker_steps,
        val_contexts=64,
        seed=cfg.seed,
    )
    trained = train_remasker(denoiser, tokenizer, run, "stdlib:code", rcfg, progress=True)
    remasker = load_remasker(run, denoiser)
    scorer = load_model("zoo:code-lm")
    length = int(denoiser.network.config.max_position_embeddings)
    template, attention = build_templates(tokenizer, denoiser.mask_id, cfg.diffusion_samples, length)
    columns, rows = [], []
    for name in ("mdlm", "remdm-cap", "star", "gstar"):
        config = SamplerConfig(sampler=name, steps=16)
        result = sample(
            denoiser, config, template, attention, cfg.seed, 64, remasker if name == "gstar" else None
        )
        metrics = cell_metrics(result, tokenizer, scorer)
        rows.append(
            {"sampler": name} | {k: metrics[k] for k in ("gen_ppl", "entropy", "python_validity", "nfe")}
        )
        with torch.no_grad():
            flags = remasker(result.tokens_NL[:3], result.attention_NL[:3])
        shown = shown_samples(
            tokenizer, result.tokens_NL[:3], result.generated_NL[:3], result.attention_NL[:3], flags
        )
        columns.append((name, shown))
    ctx.summary["diffusion"] = {"remasker": trained, "samplers": rows}
    intro = (
        f"<p>zoo:code-mdlm (a masked diffusion LM on the stdlib's Python source) sampled with four samplers at 16 "
        f"steps, {cfg.diffusion_samples} samples of {length} tokens each from the same seeds; generative perplexity "
        f"under zoo:code-lm. Highlighted: the tokens a one-block remasker ({cfg.remasker_steps} steps, validation "
        f"F1 {trained['val_f1']:.2f}) flags as likely errors in the finished samples.</p>"
    )
    return [
        Section(
            "Masked diffusion: samplers side by side",
            intro
            + metrics_table(rows)
            + side_by_side_html(columns, "the first three samples of each sampler"),
        )
    ]


def lime_stage(ctx: DemoContext) -> list[Section]:
    """LIMe vs Llama from the same weights and batches: loss curves, value entropy, router heatmap."""
    from interlayer.lime.report import analysis_sections, training_sections
    from interlayer.lime.train import LimeTrainConfig, train
    from interlayer.lime.workflows import analyze

    cfg = ctx.cfg
    tcfg = LimeTrainConfig(
        layers=4,
        d_model=64,
        heads=2,
        kv_heads=2,
        intermediate=176,
        context_len=64,
        batch_size=16,
        steps=cfg.lime_steps,
        eval_every=max(1, cfg.lime_steps // 5),
        val_contexts=64,
        checkpoint_every=max(1, cfg.lime_steps // 5),
        seed=cfg.seed,
    )
    run = cfg.out / "lime" / f"train-{cfg.lime_steps}"
    trained = train(run, tcfg, ("lime", "llama"))
    runs = trained["runs"]
    analysis = analyze(
        runs["lime"]["model"], run / "analysis", runs["llama"]["model"], contexts=32, context_len=64
    )
    ctx.summary["lime"] = {
        "val_loss": {name: r["val_loss"] for name, r in runs.items()},
        "value_entropy": analysis["value_entropy"],
        "expected_layer": analysis["expected_layer"],
    }
    intro = (
        f"<p>LIMe (every layer's attention reads keys and values mixed from all earlier layers) and Llama, "
        f"4 layers, d = 64, trained {cfg.lime_steps} steps from the same weights on the same stdlib:code "
        f"batches; validation loss {runs['lime']['val_loss']:.3f} (LIMe) vs {runs['llama']['val_loss']:.3f} "
        f"(Llama) nats/token. Value entropy: matrix Rényi entropy (α = 0.5) of each layer's values on 32 "
        f"validation contexts.</p>"
    )
    sections = training_sections(run, trained)[:2] + analysis_sections(
        {"LIMe": analysis["value_entropy"]["LIMe"], "Llama": analysis["value_entropy"]["baseline"]},
        analysis["router_shares"],
        analysis["expected_layer"],
        analysis["alpha"],
    )
    first = Section("LIMe vs Llama: " + sections[0].title.lower(), intro + sections[0].body_html)
    return [first, *(Section("LIMe: " + s.title.lower(), s.body_html) for s in sections[1:])]


def varan_stage(ctx: DemoContext) -> list[Section]:
    """VARAN vs the last layer, LoRA on synth:styles: test accuracy and the posterior over layers."""
    from interlayer.speech.report import posterior_section
    from interlayer.speech.train import VaranTrainConfig
    from interlayer.speech.workflows import train_run

    cfg = ctx.cfg
    sizes = {"train": 400, "validation": 100, "test": 200}
    results = {}
    for aggregation in ("varan", "last"):
        tcfg = VaranTrainConfig(
            aggregation=aggregation,
            steps=cfg.varan_steps,
            eval_every=max(1, cfg.varan_steps // 3),
            checkpoint_every=max(1, cfg.varan_steps // 3),
            seed=cfg.seed,
        )
        run = cfg.out / "varan" / f"{aggregation}-{cfg.varan_steps}"
        results[aggregation] = train_run(run, cfg.speech_model, "synth:styles", tcfg, sizes, progress=True)
    varan, last = results["varan"]["test"], results["last"]["test"]
    ctx.summary["varan"] = {
        "accuracy": {"varan": varan["accuracy"], "last": last["accuracy"]},
        "mean_posterior": varan["mean_posterior"],
    }
    rows = [
        {"aggregation": name, "test accuracy": r["test"]["accuracy"], "trainable": r["trainable_parameters"]}
        for name, r in results.items()
    ]
    intro = (
        f"<p>{escape(cfg.speech_model)} fine-tuned with LoRA (rank 16 on the feed-forward layers) for "
        f"{cfg.varan_steps} steps of 16 clips to tell four speaking styles apart (synth:styles: words spoken by "
        f"eSpeak NG, {sizes['test']} test clips, chance 0.25), with VARAN's heads on every layer and its "
        "posterior over layers, or with one head on the last layer.</p>"
    )
    return [
        Section("VARAN vs the last layer: speaking style", intro + metrics_table(rows)),
        posterior_section({"VARAN": varan["mean_posterior"]}, "VARAN: posterior over layers"),
    ]


Stage = Callable[[DemoContext], list[Section]]
STAGES: list[tuple[str, Stage]] = [
    ("sae", sae_stage),
    ("budgets", budgets_stage),
    ("flow", flow_stage),
    ("steering", steering_stage),
    ("diffusion", diffusion_stage),
    ("lime", lime_stage),
    ("varan", varan_stage),
]


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage, write ``report.html`` and ``summary.json`` into ``cfg.out``; return the summary."""
    started = time.monotonic()
    ctx = DemoContext(cfg, load_model(cfg.model))
    sections: list[Section] = []
    for name, stage in STAGES:
        if name in cfg.stages:
            sections += stage(ctx)
    report = write_report(
        cfg.out / "report.html", "interlayer demo", sections, subtitle=f"{cfg.model} on {cfg.data}"
    )
    summary = {
        "report": str(report),
        "seconds": round(time.monotonic() - started, 1),
        "config": asdict(cfg) | {"out": str(cfg.out), "stages": list(cfg.stages)},
    }
    summary |= ctx.summary
    write_json(cfg.out / "summary.json", summary)
    return summary
