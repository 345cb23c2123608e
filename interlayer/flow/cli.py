"""``interlayer flow``: SAE Match between layers, feature-flow graphs, and steering along them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from interlayer.cli_common import ContextOpt, DeviceOpt, JsonOpt, emit, print_table
from interlayer.errors import UserError
from interlayer.progress import progress_bar

if TYPE_CHECKING:  # imported where used at run time, to keep the CLI's start fast
    from interlayer.models import LoadedModel
    from interlayer.sae import SparseAutoencoder

flow_app = typer.Typer(
    help="Features across layers: SAE Match, feature-flow graphs, multi-layer steering.", no_args_is_help=True
)

SaesOpt = Annotated[
    list[Path],
    typer.Option(
        "--saes",
        help="A run folder with one SAE per site (any format load_saes reads), or repeat for single SAE folders.",
    ),
]
OptionalModelOpt = Annotated[
    str | None, typer.Option("--model", help="The SAEs' model (default: the one their cfg.json names).")
]
OptionalDataOpt = Annotated[
    str, typer.Option("--data", help="Text for the evaluations on real tokens ('' for data-free only).")
]
TokensOpt = Annotated[int, typer.Option("--tokens", help="Kept validation tokens for the evaluations.")]
ResidualThresholdOpt = Annotated[
    float,
    typer.Option("--residual-threshold", help="τ_R: cut a flow graph where the residual cosine is below."),
]
ModuleThresholdOpt = Annotated[
    float, typer.Option("--module-threshold", help="τ_M: keep MLP/attention nodes with cosine at least this.")
]


def load_flow_saes(paths: list[Path], device: str = "cpu") -> dict[str, SparseAutoencoder]:
    """Site → SAE from one run folder, or from several SAE folders, on ``device``: a site twice, or SAEs of
    different widths or models, is an error."""
    from interlayer.models import pick_device
    from interlayer.sae import load_saes

    if not paths:
        raise UserError("pass --saes: a run folder, or several SAE folders")
    saes: dict[str, SparseAutoencoder] = {}
    for path in paths:
        for site, sae in load_saes(path, pick_device(device)).items():
            if site in saes:
                raise UserError(f"two SAEs for site {site} among --saes; pass one per site")
            saes[site] = sae
    widths = {sae.cfg.d_in for sae in saes.values()}
    models = {sae.cfg.model for sae in saes.values() if sae.cfg.model}
    if len(widths) > 1 or len(models) > 1:
        detail = ", ".join(
            f"{site}: d_in {sae.cfg.d_in}, model {sae.cfg.model or '?'}" for site, sae in saes.items()
        )
        raise UserError(f"the SAEs must read one model, but they differ ({detail})")
    return saes


def model_of(saes: dict[str, SparseAutoencoder], model: str | None, device: str) -> LoadedModel:
    """The model named by ``--model``, else the one every SAE names (an error when they disagree or none does)."""
    from interlayer.models import load_model

    if model is None:
        named = {sae.cfg.model for sae in saes.values() if sae.cfg.model}
        if len(named) != 1:
            raise UserError(
                "pass --model: the SAEs name "
                + (f"several models ({', '.join(sorted(named))})" if named else "no model")
            )
        model = named.pop()
    return load_model(model, device=device)


@flow_app.command("match")
def match(
    saes: SaesOpt,
    out: Annotated[Path, typer.Option("--out", help="Output folder (rerun to resume).")],
    terms: Annotated[
        str, typer.Option("--terms", help="Folded terms the cost compares, comma-separated.")
    ] = ("encoder,decoder,bias"),
    fold: Annotated[
        str,
        typer.Option(
            "--fold", help="auto, threshold (JumpReLU/BatchTopK), data (TopK: mean activation) or none."
        ),
    ] = "auto",
    model: OptionalModelOpt = None,
    data: OptionalDataOpt = "",
    tokens: TokensOpt = 20_000,
    skip_tokens: Annotated[
        int, typer.Option("--skip-tokens", help="Kept tokens for layer skipping.")
    ] = 4_000,
    context_len: ContextOpt = 128,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Match the features of every consecutive pair of SAEs (SAE Match); permutations as safetensors, scores as
    JSON. With --data, also the matching score on real tokens and layer skipping."""
    from interlayer.flow.run import MatchSettings, match_run

    sae_map = load_flow_saes(saes, device)
    settings = MatchSettings(
        tuple(t.strip() for t in terms.split(",")), fold, data, tokens, skip_tokens, context_len
    )
    lm = model_of(sae_map, model, device) if data else None
    from interlayer.flow.evaluate import consecutive_pairs

    with progress_bar("matching pairs", len(consecutive_pairs(list(sae_map)))) as bar:
        summary = match_run(sae_map, out, settings, lm, on_pair=lambda _a, _b: bar.advance(1))
    if not as_json:
        rows = [
            {k: v for k, v in row.items() if k != "layer_skipping"}
            | {f"ev_{name}": v["ev"] for name, v in row.get("layer_skipping", {}).items()}
            for row in summary["pairs"]
        ]
        print_table(f"SAE Match ({out})", rows)
    emit({"out": str(out)} | summary, as_json)


@flow_app.command("graph")
def graph(
    saes: SaesOpt,
    feature: Annotated[
        str, typer.Option("--feature", help="The root feature, SITE:INDEX (e.g. layers.3:123).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder: graph.json, flow.json, report.html.")],
    top_k: Annotated[int, typer.Option("--top-k", help="Matches followed per step (1: top-1 cosine).")] = 1,
    residual_threshold: ResidualThresholdOpt = 0.5,
    module_threshold: ModuleThresholdOpt = 0.15,
    layers_back: Annotated[
        int | None, typer.Option("--layers-back", help="Layers to walk back (default all).")
    ] = None,
    layers_forward: Annotated[
        int | None, typer.Option("--layers-forward", help="Layers to walk forward (default all).")
    ] = None,
    model: OptionalModelOpt = None,
    data: OptionalDataOpt = "",
    tokens: TokensOpt = 8_000,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """The flow graph of one feature across layers (decoder cosines, cut below the thresholds), the classes of
    every residual feature, and report.html; with --data the nodes show their top contexts."""
    from interlayer.flow.graph import flow_graph, parse_feature
    from interlayer.flow.report import write_graph_report
    from interlayer.flow.similarity import FlowThresholds

    sae_map = load_flow_saes(saes, device)
    root = parse_feature(feature, sae_map)
    thresholds = FlowThresholds(residual_threshold, module_threshold)
    flow = flow_graph(sae_map, root, thresholds, top_k, layers_back, layers_forward)
    lm = model_of(sae_map, model, device) if data else None
    summary = write_graph_report(out, sae_map, [flow], thresholds, lm, data, tokens)
    if not as_json:
        print_table(
            f"flow graph of {feature}",
            [{"source": e.source, "target": e.target, "cosine": e.similarity} for e in flow.edges],
        )
        print(f"report: {summary['report']}")
    emit(summary, as_json)


def parse_layers(text: str) -> tuple[int, int]:
    """``a-b`` (or ``a``) → (a, b) with 0 ≤ a ≤ b."""
    first, _, last = text.partition("-")
    if not first.isdigit() or (last and not last.isdigit()):
        raise UserError(f"--layers is a layer or a range a-b, e.g. 1-3; got {text!r}")
    start, end = int(first), int(last or first)
    if end < start:
        raise UserError(f"--layers {text}: the range ends before it starts")
    return start, end


@flow_app.command("steer")
def steer_command(
    saes: SaesOpt,
    feature: Annotated[
        str, typer.Option("--feature", help="The feature to steer, SITE:INDEX (e.g. layers.2:17).")
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue with and without steering.")],
    strength: Annotated[
        float,
        typer.Option(
            "--strength", help="s: added along the unit direction at each layer (with --total: in all)."
        ),
    ] = 8.0,
    schedule: Annotated[
        str,
        typer.Option("--schedule", help="How s is spread over --layers: constant, linear or exponential."),
    ] = "constant",
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", help="Steer along the feature's flow graph over layers a-b (default: its layer only)."
        ),
    ] = None,
    total: Annotated[
        bool,
        typer.Option("--total/--per-layer", help="Scale the layer strengths to sum to s, or give s to each."),
    ] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 30,
    model: OptionalModelOpt = None,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Generate from --prompt without and with steering one feature (or its flow graph across --layers)."""
    from interlayer.flow.graph import flow_graph, parse_feature
    from interlayer.flow.interventions import steering_terms
    from interlayer.flow.steering import generate_pair

    sae_map = load_flow_saes(saes, device)
    root = parse_feature(feature, sae_map)
    chain = [(root.site, root.feature)]
    if layers is not None:
        start, end = parse_layers(layers)
        graph = flow_graph(sae_map, root)
        chain = [(n.site, n.feature) for n in graph.residual_chain() if start <= n.layer <= end]
        if not chain:
            raise UserError(f"the flow graph of {feature} has no residual feature in layers {layers}")
    lm = model_of(sae_map, model, device)
    if not lm.is_causal_lm:
        raise UserError(f"{lm.name} has no LM head: steering prints generated text, which needs a causal LM")
    terms = steering_terms(sae_map, chain, strength, schedule, total=total)
    plain, steered = generate_pair(lm, prompt, terms, max_new_tokens)
    summary = {
        "prompt": prompt,
        "unsteered": plain,
        "steered": steered,
        "terms": [{"site": t.site, "strength": t.strength} for t in terms],
    }
    if not as_json:
        print_table("steering", [{"site": t.site, "strength": t.strength} for t in terms])
        print(f"without: {prompt}{plain}")
        print(f"with:    {prompt}{steered}")
    emit(summary, as_json)
