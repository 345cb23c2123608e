"""``interlayer sae``: train and evaluate sparse autoencoders.

Defaults are never written twice: training options take theirs from :class:`~interlayer.sae.trainer.TrainConfig`
(class attributes of the dataclass), and architecture options default to None, meaning "the architecture
config's own default" (tests/sae/test_cli_options.py checks that every config field has its flag).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from interlayer.activations import ChunkPlan
from interlayer.cli_common import (
    ChunkOpt,
    ContextOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MixOpt,
    ModelBatchOpt,
    OutlierOpt,
    emit,
    int_list,
    print_table,
)
from interlayer.errors import UserError
from interlayer.progress import progress_bar
from interlayer.sae.architectures import ARCHITECTURES, config_fields, make_config
from interlayer.sae.config import SAEConfig
from interlayer.sae.trainer import TrainConfig

if TYPE_CHECKING:  # imported where used at run time, to keep the CLI's start fast
    from interlayer.distributed import ProcessGroup
    from interlayer.sources import ActivationSource

sae_app = typer.Typer(help="Sparse autoencoders: train and evaluate.", no_args_is_help=True)

T = TrainConfig  # defaults below are read from the dataclass, never restated

# The training flags `sae train` and `sae boost` share (defaults from TrainConfig at each use).
TokensOpt = Annotated[int, typer.Option("--tokens", help="Training tokens per SAE.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Tokens per optimiser step.")]
LrOpt = Annotated[
    float | None,
    typer.Option("--lr", help="Peak Adam lr; default 4e-3·(F/2^14)^(-1/4), F the trained latents."),
]
LrDecayOpt = Annotated[
    float, typer.Option("--lr-decay-fraction", help="Final fraction of steps over which lr decays to 0.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seeds initialisation and data order.")]
AuxAlphaOpt = Annotated[float, typer.Option("--aux-alpha", help="Weight of the AuxK loss.")]
KAuxOpt = Annotated[
    int | None, typer.Option("--k-aux", help="Dead latents AuxK uses per token; default d/2.")
]
DeadTokensOpt = Annotated[
    int, typer.Option("--dead-tokens", help="Tokens without firing before AuxK treats a latent as inactive.")
]
NormaliseOpt = Annotated[
    bool, typer.Option("--normalise/--no-normalise", help="Scale inputs to E‖x‖² = d in training.")
]
DistributeOpt = Annotated[
    str,
    typer.Option(
        "--distribute",
        help="Under torchrun: 'sites' (each process trains a block of sites) or 'data' "
        "(each trains every SAE on its share of each batch).",
    ),
]
CheckpointOpt = Annotated[
    float, typer.Option("--checkpoint-seconds", help="Min seconds between checkpoints.")
]
OWN_COMMANDS = {"boosted": "interlayer sae boost"}
"""Architectures that ``sae train`` does not train, and the command that does."""
ARCHITECTURE_OPTIONS = sorted(
    {name for arch in ARCHITECTURES if arch not in OWN_COMMANDS for name in config_fields(arch)}
    - {f.name for f in fields(SAEConfig)}
)
"""Config fields of some architecture that the user sets with ``sae train`` (each has a flag of the same name)."""


def architecture_config(architecture: str, latents: int, options: dict[str, Any]) -> SAEConfig:
    """The config of ``architecture`` (``d_in`` filled in per site later) from the options the user gave.

    An option that ``architecture`` has no field for is a UserError naming it; so is a missing ``--k``.
    """
    given = {name: value for name, value in options.items() if value is not None}
    if "k" in config_fields(architecture) and "k" not in given:
        raise UserError(f"--k is required for a {architecture} SAE")
    return make_config(architecture, d_in=1, latents=latents, **given)


@sae_app.command("train")
def sae_train(
    out: Annotated[
        Path, typer.Option("--out", help="Run folder: one SAE folder per site (rerun to resume).")
    ],
    latents: Annotated[int, typer.Option("--latents", help="Dictionary size F.")],
    k: Annotated[
        int | None,
        typer.Option("--k", help="Active latents per token (HierarchicalTopK: the largest budget K)."),
    ] = None,
    architecture: Annotated[
        str,
        typer.Option(
            "--architecture", help=f"One of {', '.join(a for a in ARCHITECTURES if a not in OWN_COMMANDS)}."
        ),
    ] = "topk",
    prefixes: Annotated[
        str | None, typer.Option("--prefixes", help="matryoshka: increasing widths ending at --latents.")
    ] = None,
    heads: Annotated[int | None, typer.Option("--heads", help="kron: heads h (h·m·n = latents).")] = None,
    m: Annotated[int | None, typer.Option("--m", help="kron: p factors per head (m ≤ n).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="kron: q factors per head.")] = None,
    l0_coefficient: Annotated[
        float | None, typer.Option("--l0-coefficient", help="jumprelu: λ, the L0 price in units of FVU.")
    ] = None,
    bandwidth: Annotated[
        float | None, typer.Option("--bandwidth", help="jumprelu: straight-through kernel width ε.")
    ] = None,
    l1_coefficient: Annotated[
        float | None, typer.Option("--l1-coefficient", help="relu: λ, the L1 price in units of FVU.")
    ] = None,
    initial_threshold: Annotated[
        float | None, typer.Option("--initial-threshold", help="jumprelu: θ at initialisation.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="HF id, local folder, 'minilm' or 'zoo:NAME'.")
    ] = None,
    sites: Annotated[
        str | None, typer.Option("--sites", help="Sites or globs; default: all sites of the model/cache.")
    ] = None,
    data: DataOpt = "stdlib:docs",
    activations: Annotated[
        Path | None,
        typer.Option("--activations", help="Train from this activation cache instead of a model."),
    ] = None,
    tokens: TokensOpt = T.tokens,
    batch_size: BatchOpt = T.batch_size,
    lr: LrOpt = T.lr,
    lr_decay_fraction: LrDecayOpt = T.lr_decay_fraction,
    seed: SeedOpt = T.seed,
    aux_alpha: AuxAlphaOpt = T.aux_alpha,
    k_aux: KAuxOpt = T.k_aux,
    dead_tokens: DeadTokensOpt = T.dead_tokens,
    normalise: NormaliseOpt = T.normalise,
    checkpoint_seconds: CheckpointOpt = T.checkpoint_seconds,
    outlier_norm: OutlierOpt = T.outlier_norm,
    context_len: ContextOpt = ChunkPlan.context_len,
    model_batch_size: ModelBatchOpt = ChunkPlan.batch_size,
    chunk_batches: ChunkOpt = ChunkPlan.batches_per_chunk,
    mix_chunks: MixOpt = ChunkPlan.mix_chunks,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    distribute: DistributeOpt = "sites",
    as_json: JsonOpt = False,
) -> None:
    """Train one SAE per site from one model forward (or from an activation cache)."""
    given = dict(locals())  # the options, read by config field name below (so no option is dropped)
    if architecture in OWN_COMMANDS:
        raise UserError(
            f"a {architecture} SAE is not trained with `sae train`: use `{OWN_COMMANDS[architecture]}`"
        )
    from interlayer.distributed import process_group, rank_device
    from interlayer.sources import activation_source

    template = architecture_config(
        architecture,
        latents,
        {name: given[name] for name in ARCHITECTURE_OPTIONS} | {"prefixes": int_list(prefixes, "--prefixes")},
    )
    train_cfg = TrainConfig(**{f.name: given[f.name] for f in fields(TrainConfig)})
    group = process_group(device)  # several processes under torchrun: each trains a block of sites
    device = rank_device(device)
    plan = ChunkPlan(context_len, model_batch_size, chunk_batches, mix_chunks)
    source = activation_source(
        model=model,
        sites=sites,
        data=data,
        activations=activations,
        plan=plan,
        device=device,
        dtype=dtype,
        seed=seed,
    )
    train_and_report(
        out, source, template, train_cfg, device, group, distribute, as_json,
        (f"training {len(source.sites)} SAE(s)", f"trained SAEs in {out}"),
    )  # fmt: skip


def train_and_report(
    out: Path,
    source: ActivationSource,
    template: SAEConfig,
    train_cfg: TrainConfig,
    device: str,
    group: ProcessGroup,
    distribute: str,
    as_json: bool,
    titles: tuple[str, str],
) -> None:
    """Train ``template``'s SAEs on ``source`` with a progress bar, then (rank 0 alone) print the table and the
    JSON summary; ``titles`` are the bar's and the table's."""
    from interlayer.sae.training_run import train_from_source

    with progress_bar(titles[0], train_cfg.steps, visible=group.is_main) as bar:
        metrics = train_from_source(
            out,
            source,
            template,
            train_cfg,
            device=device,
            on_step=lambda step, s: bar.show(step, _status(s)),
            group=group,
            distribute=distribute,
        )
    if not group.is_main:
        return
    if not as_json:
        print_table(titles[1], [{"site": site, **values} for site, values in metrics["sites"].items()])
    emit({"out": str(out), **metrics}, as_json)


def _status(summaries: dict[str, Any]) -> str:
    first = next(iter(summaries.values()))
    return f"fvu {first.fvu:.3f} l0 {first.l0:.1f}"


def recorded_data(sae: Path) -> str | None:
    """The ``--data`` of the training run that wrote ``sae`` (a run folder or one SAE folder in it), if known."""
    from interlayer.atomic import read_json
    from interlayer.sae.trainer import RUN_FILE

    for folder in (sae, sae.parent):
        if (folder / RUN_FILE).is_file():
            data = read_json(folder / RUN_FILE, "run settings").get("data")
            return str(data) if data else None
    return None


@sae_app.command("eval")
def sae_eval(
    sae: Annotated[
        str,
        typer.Option(
            "--sae",
            help="An SAE folder (interlayer, SAELens, sparsify, Gemma Scope, dictionary_learning), a run "
            "folder holding one per site, or hf://owner/repo/path.",
        ),
    ],
    model: Annotated[str | None, typer.Option("--model", help="Default: the model in cfg.json.")] = None,
    site: Annotated[
        str | None,
        typer.Option(
            "--site", help="Evaluate one SAE at this site (default: its own; for a foreign hook name)."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Evaluation text; default: the run's own --data (else stdlib:docs)."),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Evaluation tokens (validation split).")] = 20_000,
    k_eval: Annotated[
        str | None,
        typer.Option(
            "--k-eval", help="Comma-separated budgets k: every metric at each (architectures with a k)."
        ),
    ] = None,
    context_len: ContextOpt = ChunkPlan.context_len,
    model_batch_size: ModelBatchOpt = 16,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    outlier_norm: OutlierOpt = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate SAEs: pooled EV, FVU, L0, dead/dense latents, and spliced CE/KL (or pooled cosine)."""
    from interlayer.activations import check_outlier_norm
    from interlayer.models import load_model, pick_device
    from interlayer.sae.evaluate import evaluate_at_budgets
    from interlayer.sae.io import load_saes

    check_outlier_norm(outlier_norm)
    saes = load_saes(sae, device=pick_device(device))
    if site is not None:
        if len(saes) != 1:
            raise UserError(f"--site names the site of one SAE, but {sae} holds {len(saes)}")
        saes = {site: next(iter(saes.values()))}
    budgets: list[int | None] = list(int_list(k_eval, "--k-eval") or ()) or [None]
    for k in budgets:
        for loaded in saes.values():
            loaded.check_k(k)
    data = data or recorded_data(Path(sae)) or "stdlib:docs"
    model = model or next(iter(saes.values())).cfg.model
    if not model:
        raise UserError("the SAE's cfg.json names no model; pass --model")
    lm = load_model(model, device=device, dtype=dtype)
    with progress_bar(f"evaluating {len(budgets)} budget(s)", tokens) as bar:
        evaluations = evaluate_at_budgets(
            lm,
            saes,
            data,
            tokens,
            budgets,
            context_len,
            model_batch_size,
            on_batch=lambda n: bar.advance(n),
            outlier_norm=outlier_norm,
        )
    by_k = {
        str(k): {site: evaluation.metrics(site) for site in saes} for k, evaluation in evaluations.items()
    }
    rows = [{"site": s, "k": k, **m} for k, results in by_k.items() for s, m in results.items()]
    if not as_json:
        if budgets == [None]:
            rows = [{key: v for key, v in row.items() if key != "k"} for row in rows]
        print_table(f"SAE metrics on {data} (validation)", rows)
    summary: dict[str, Any] = {"model": model, "data": data, "outlier_norm": outlier_norm}
    if budgets == [None]:
        summary["sites"] = by_k["None"]
    else:
        summary["by_k"] = by_k
    emit(summary, as_json)


@sae_app.command("export")
def sae_export(
    src: Annotated[str, typer.Argument(help="An SAE folder or run folder (any format load_sae reads).")],
    to: Annotated[str, typer.Option("--to", help="saelens or sparsify.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write (a run's SAEs go to one subfolder per hook point).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Write SAEs in another library's format: SAELens folders (which SAEBench and Neuronpedia read) or
    sparsify folders."""
    from interlayer.sae.formats import EXPORTS, check_writable, write_as
    from interlayer.sae.formats.hooks import saelens_hook
    from interlayer.sae.io import load_saes

    if to not in EXPORTS:
        raise UserError(f"--to must be one of {', '.join(EXPORTS)}, got {to!r}")
    if out.exists() and any(out.iterdir()):  # never mix a new export into (or over) other files
        raise UserError(f"--out {out} is not empty; choose a new folder")
    saes = load_saes(src)
    for loaded in saes.values():  # refuse before writing anything
        check_writable(loaded, to)
    written = {}
    for site, loaded in saes.items():
        folder = out if len(saes) == 1 else out / (saelens_hook(site) if to == "saelens" else site)
        written[site] = str(write_as(loaded, to, folder))
    if not as_json:
        print_table(f"exported to {to}", [{"site": s, "folder": f} for s, f in written.items()])
    emit({"to": to, "folders": written}, as_json)


@sae_app.command("boost")
def sae_boost(
    base: Annotated[
        str,
        typer.Option(
            "--base", help="The base SAE: any SAE load_sae reads (a boosted one stacks a residual)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Run folder: <out>/<site>/ holds the boosted SAE (rerun to resume).")
    ],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="The domain's text: local file/folder, HF dataset id, stdlib:docs or stdlib:code "
            "(with --activations: the cache's own).",
        ),
    ] = None,
    activations: Annotated[
        Path | None,
        typer.Option(
            "--activations", help="Train from this activation cache of the domain instead of a model."
        ),
    ] = None,
    latents: Annotated[int, typer.Option("--latents", help="Residual dictionary size.")] = 1024,
    k: Annotated[int, typer.Option("--k", help="Residual active latents per token.")] = 5,
    model: Annotated[
        str | None, typer.Option("--model", help="Default: the model in the base's cfg.json.")
    ] = None,
    site: Annotated[str | None, typer.Option("--site", help="Default: the base's site.")] = None,
    tokens: TokensOpt = T.tokens,
    batch_size: BatchOpt = T.batch_size,
    lr: LrOpt = T.lr,
    lr_decay_fraction: LrDecayOpt = T.lr_decay_fraction,
    seed: SeedOpt = T.seed,
    aux_alpha: AuxAlphaOpt = T.aux_alpha,
    k_aux: KAuxOpt = T.k_aux,
    dead_tokens: DeadTokensOpt = T.dead_tokens,
    normalise: NormaliseOpt = T.normalise,
    checkpoint_seconds: CheckpointOpt = T.checkpoint_seconds,
    outlier_norm: OutlierOpt = T.outlier_norm,
    context_len: ContextOpt = ChunkPlan.context_len,
    model_batch_size: ModelBatchOpt = ChunkPlan.batch_size,
    chunk_batches: ChunkOpt = ChunkPlan.batches_per_chunk,
    mix_chunks: MixOpt = ChunkPlan.mix_chunks,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    distribute: DistributeOpt = "data",
    as_json: JsonOpt = False,
) -> None:
    """SAE Boost: train a residual SAE on the base SAE's error on a domain; saves base + residual as one SAE."""
    given = dict(locals())
    from interlayer.activations import ActivationCache
    from interlayer.distributed import process_group, rank_device
    from interlayer.sae.boosted import boost_config
    from interlayer.sae.io import load_sae
    from interlayer.sources import activation_source

    train_cfg = TrainConfig(**{f.name: given[f.name] for f in fields(TrainConfig)})
    # under torchrun the processes share each batch (one site: --distribute data)
    group = process_group(device)
    device = rank_device(device)
    base_sae = load_sae(base)
    base_site = base_sae.cfg.site
    # an imported base whose foreign hook name has no interlayer site may be placed with --site
    unmapped = bool(base_sae.cfg.source_format) and base_site == base_sae.cfg.source_site
    if site is not None and base_site and site != base_site and not unmapped:
        raise UserError(
            f"the base SAE was trained on site {base_site}, not {site}: a residual reads its base's site "
            "(leave out --site)"
        )
    site = site or base_site
    if not site:
        raise UserError("the base SAE names no site; pass --site")
    plan = ChunkPlan(context_len, model_batch_size, chunk_batches, mix_chunks)
    if activations is not None:  # the cache says which model and text its activations came from
        source = activation_source(sites=site, activations=activations, plan=plan, seed=seed)
        model = source.model
        data = data or str(ActivationCache(activations).manifest.get("data", ""))
    else:
        model = model or base_sae.cfg.model
        if not model:
            raise UserError("the base SAE names no model; pass --model")
        if data is None:
            raise UserError("pass --data, the domain's text (or --activations, a cache of it)")
        source = activation_source(
            model=model, sites=site, data=data, plan=plan, device=device, dtype=dtype, seed=seed
        )
    template = boost_config(base_sae, base, latents, k, data or "")
    if len(source.sites) != 1:
        raise UserError(f"--site must name one site, but {site!r} matches {len(source.sites)}")
    if source.width != template.d_in:
        raise UserError(
            f"a residual for a base of another width: the base SAE reads width {template.d_in} but site "
            f"{source.sites[0]} of {model} has width {source.width}; pass the base's model with --model"
        )
    train_and_report(
        out, source, template, train_cfg, device, group, distribute, as_json,
        ("training a residual SAE", f"boosted SAE in {out}"),
    )  # fmt: skip


@sae_app.command("stack")
def sae_stack(
    first: Annotated[str, typer.Argument(help="A boosted SAE (any folder load_sae reads).")],
    second: Annotated[str, typer.Argument(help="A boosted SAE over the identical base.")],
    out: Annotated[Path, typer.Option("--out", help="SAE folder: the base with both SAEs' residuals.")],
    as_json: JsonOpt = False,
) -> None:
    """Sum domain residuals: one boosted SAE with the first's residuals, then the second's, over their base."""
    from interlayer.sae.boosted import stack_boosted
    from interlayer.sae.io import load_sae, save_sae

    stacked = stack_boosted(load_sae(first), load_sae(second))
    save_sae(stacked, out)
    summary = {
        "out": str(out),
        "latents": stacked.cfg.latents,
        "residual_latents": list(stacked.cfg.residual_latents),
        "residual_data": list(stacked.cfg.residual_data),
    }
    if not as_json:
        print_table(f"stacked boosted SAE in {out}", [summary])
    emit(summary, as_json)
