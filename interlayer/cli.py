"""The ``interlayer`` command line (also ``python -m interlayer``).

Every mistake a user can make ends in one line on stderr and exit code 2 (:class:`~interlayer.errors.UserError`);
long commands show a progress bar on stderr, resume from their output folder, and with ``--json`` print a
machine-readable summary as the last line of stdout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from transformers.utils import logging as transformers_logging

from interlayer.errors import UserError
from interlayer.progress import progress_bar, stderr_console

app = typer.Typer(
    help="Work inside the layers of transformers.", no_args_is_help=True, pretty_exceptions_show_locals=False
)
sae_app = typer.Typer(help="Sparse autoencoders: train and evaluate.", no_args_is_help=True)
activations_app = typer.Typer(help="Activations at sites: cache them on disk.", no_args_is_help=True)
zoo_app = typer.Typer(help="Tiny reference models trained here: list and build them.", no_args_is_help=True)
app.add_typer(sae_app, name="sae")
app.add_typer(activations_app, name="activations")
app.add_typer(zoo_app, name="zoo")

ModelOpt = Annotated[str, typer.Option("--model", help="HF id, local folder, 'minilm' or 'zoo:NAME'.")]
DataOpt = Annotated[
    str, typer.Option("--data", help="Local file/folder, HF dataset id, stdlib:docs or stdlib:code.")
]
SitesOpt = Annotated[
    str, typer.Option("--sites", help="Site names or globs, comma-separated (see `interlayer sites`).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Model dtype: float32, bfloat16 or float16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary as the last line.")]
ContextOpt = Annotated[int, typer.Option("--context-len", help="Tokens per packed context.")]
ModelBatchOpt = Annotated[int, typer.Option("--model-batch-size", help="Contexts per model forward pass.")]
ChunkOpt = Annotated[int, typer.Option("--chunk-batches", help="Model batches per shuffle chunk.")]
OutlierOpt = Annotated[
    float,
    typer.Option(
        "--outlier-norm",
        help="Leave out tokens with norm > this × the median norm at the site (0: keep all).",
    ),
]


def _emit(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=True))


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns)
        )
    return table


@app.command()
def sites(model: ModelOpt, device: DeviceOpt = "cpu", as_json: JsonOpt = False) -> None:
    """List a model's sites with their modules and widths."""
    from interlayer.models import load_model
    from interlayer.sites import model_sites

    lm = load_model(model, device=device)
    rows = [
        {"site": s.name, "module": s.module_path, "width": s.width} for s in model_sites(lm.model).values()
    ]
    if not as_json:
        stderr_console.print(_table(f"sites of {model}", rows))
    _emit({"model": model, "sites": rows}, as_json)


@activations_app.command("cache")
def activations_cache(
    model: ModelOpt,
    sites: SitesOpt,
    out: Annotated[Path, typer.Option("--out", help="Cache folder (rerun to resume).")],
    data: DataOpt = "stdlib:docs",
    tokens: Annotated[int, typer.Option("--tokens", help="Kept tokens to cache.")] = 1_000_000,
    context_len: ContextOpt = 128,
    model_batch_size: ModelBatchOpt = 32,
    chunk_batches: ChunkOpt = 8,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Cache activations at sites as safetensors shards plus a manifest."""
    from interlayer.activations import ChunkPlan, cache_activations
    from interlayer.models import load_model

    plan = ChunkPlan(context_len, model_batch_size, chunk_batches)
    lm = load_model(model, device=device, dtype=dtype)
    with progress_bar("caching", tokens) as bar:
        cache = cache_activations(lm, [sites], data, tokens, out, plan, on_chunk=lambda n: bar.advance(n))
    _emit(
        {
            "out": str(out),
            "sites": cache.sites,
            "tokens": cache.manifest["tokens"],
            "shards": len(cache.manifest["shards"]),
        },
        as_json,
    )


@sae_app.command("train")
def sae_train(
    out: Annotated[
        Path, typer.Option("--out", help="Run folder: one SAE folder per site (rerun to resume).")
    ],
    latents: Annotated[int, typer.Option("--latents", help="Dictionary size F.")],
    k: Annotated[int, typer.Option("--k", help="Active latents per token.")],
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
    tokens: Annotated[int, typer.Option("--tokens", help="Training tokens per SAE.")] = 2_000_000,
    architecture: Annotated[str, typer.Option("--architecture", help="topk or batchtopk.")] = "topk",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tokens per optimiser step.")] = 4096,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Peak Adam lr; default 4e-3·(F/2^14)^(-1/4).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    dead_tokens: Annotated[
        int, typer.Option("--dead-tokens", help="Tokens without firing before a latent counts as dead.")
    ] = 1_000_000,
    normalise: Annotated[
        bool, typer.Option("--normalise/--no-normalise", help="Scale inputs to E‖x‖² = d in training.")
    ] = True,
    checkpoint_seconds: Annotated[
        float, typer.Option("--checkpoint-seconds", help="Min seconds between checkpoints.")
    ] = 120.0,
    outlier_norm: OutlierOpt = 0.0,
    context_len: ContextOpt = 128,
    model_batch_size: ModelBatchOpt = 32,
    chunk_batches: ChunkOpt = 8,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    distribute: Annotated[
        str,
        typer.Option(
            "--distribute",
            help="Under torchrun: 'sites' (each process trains a block of sites) or 'data' "
            "(each trains every SAE on its share of each batch).",
        ),
    ] = "sites",
    as_json: JsonOpt = False,
) -> None:
    """Train one SAE per site from one model forward (or from an activation cache)."""
    from interlayer.activations import ChunkPlan
    from interlayer.distributed import process_group, rank_device
    from interlayer.sae.config import SAEConfig
    from interlayer.sae.trainer import TrainConfig
    from interlayer.sae.training_run import activation_source, train_from_source

    group = process_group(device)  # several processes under torchrun: each trains a block of sites
    device = rank_device(device)

    train_cfg = TrainConfig(
        tokens=tokens, batch_size=batch_size, lr=lr, seed=seed, dead_tokens=dead_tokens,
        normalise=normalise, checkpoint_seconds=checkpoint_seconds, outlier_norm=outlier_norm,
    )  # fmt: skip
    template = SAEConfig(d_in=1, latents=latents, k=k, architecture=architecture)
    plan = ChunkPlan(context_len, model_batch_size, chunk_batches)
    source = activation_source(
        model=model, sites=sites, data=data, activations=activations, plan=plan, device=device, dtype=dtype
    )
    with progress_bar(f"training {len(source.sites)} SAE(s)", train_cfg.steps, visible=group.is_main) as bar:
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
        rows = [{"site": site, **values} for site, values in metrics["sites"].items()]  # type: ignore[attr-defined]
        stderr_console.print(_table(f"trained SAEs in {out}", rows))
    _emit({"out": str(out), **metrics}, as_json)


def _status(summaries: dict[str, Any]) -> str:
    first = next(iter(summaries.values()))
    return f"fvu {first.fvu:.3f} l0 {first.l0:.1f}"


@sae_app.command("eval")
def sae_eval(
    sae: Annotated[Path, typer.Option("--sae", help="An SAE folder, or a run folder holding one per site.")],
    model: Annotated[str | None, typer.Option("--model", help="Default: the model in cfg.json.")] = None,
    data: DataOpt = "stdlib:docs",
    tokens: Annotated[int, typer.Option("--tokens", help="Evaluation tokens (validation split).")] = 20_000,
    context_len: ContextOpt = 128,
    model_batch_size: ModelBatchOpt = 16,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    outlier_norm: OutlierOpt = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate SAEs: pooled EV, FVU, L0, dead/dense latents, and spliced CE/KL (or pooled cosine)."""
    from interlayer.activations import check_outlier_norm
    from interlayer.models import load_model, pick_device
    from interlayer.sae.evaluate import evaluate_saes
    from interlayer.sae.io import load_sae

    check_outlier_norm(outlier_norm)
    folders = [sae] if (sae / "cfg.json").exists() else sorted(p.parent for p in sae.glob("*/cfg.json"))
    if not folders:
        raise UserError(f"no SAE found at {sae} (expected cfg.json there or in its subfolders)")
    saes = {}
    for folder in folders:
        loaded = load_sae(folder, device=pick_device(device))
        site = loaded.cfg.site or folder.name
        if site in saes:
            raise UserError(f"two SAEs for site {site} under {sae}; pass one SAE folder with --sae")
        saes[site] = loaded
    model = model or next(iter(saes.values())).cfg.model
    if not model:
        raise UserError("the SAE's cfg.json names no model; pass --model")
    lm = load_model(model, device=device, dtype=dtype)
    with progress_bar("evaluating", tokens) as bar:
        evaluation = evaluate_saes(
            lm,
            saes,
            data,
            tokens,
            context_len,
            model_batch_size,
            on_batch=lambda n: bar.advance(n),
            outlier_norm=outlier_norm,
        )
    results = {site: evaluation.metrics(site) for site in saes}
    if not as_json:
        stderr_console.print(
            _table(f"SAE metrics on {data} (validation)", [{"site": s, **m} for s, m in results.items()])
        )
    _emit({"model": model, "data": data, "outlier_norm": outlier_norm, "sites": results}, as_json)


@zoo_app.command("list")
def zoo_list(as_json: JsonOpt = False) -> None:
    """List the zoo's models: corpus, parameters, whether built, and validation figures once built."""
    from interlayer.zoo import entries, zoo_dir

    rows = entries()
    if not as_json:
        shown = [{k: v for k, v in row.items() if k != "description"} for row in rows]
        stderr_console.print(_table(f"zoo models (cache: {zoo_dir()})", shown))
    _emit({"zoo": str(zoo_dir()), "models": rows}, as_json)


@zoo_app.command("build")
def zoo_build(
    name: Annotated[str, typer.Argument(help="A zoo model (see `interlayer zoo list`).")],
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a good copy is cached.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a zoo model into the cache (a no-op when an intact copy is there, unless --force)."""
    from interlayer.zoo import build, read_manifest

    folder = build(name, force=force)
    manifest = read_manifest(folder)
    summary = {"name": manifest["name"], "path": str(folder)} | {
        k: v for k, v in manifest.items() if k not in ("files", "spec", "name")
    }
    if not as_json:
        stderr_console.print(
            _table(
                f"zoo:{manifest['name']} in {folder}",
                [
                    {
                        k: summary[k]
                        for k in (
                            "parameters",
                            "steps",
                            "val_loss",
                            "val_ppl",
                            "unigram_ppl",
                            "bigram_ppl",
                            "build_seconds",
                        )
                    }
                ],
            )
        )
    _emit(summary, as_json)


@app.command()
def demo(
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller run (under 2 minutes on 2 cores).")
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Output folder (report.html, SAEs).")] = Path(
        "interlayer-demo"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Train and evaluate a TopK SAE per layer of MiniLM on stdlib docstrings; write report.html."""
    from interlayer.demo import DemoConfig, run_demo

    summary = run_demo(DemoConfig.preset(quick, out))
    stderr_console.print(f"report: {summary['report']}")
    _emit(summary, as_json)


def main() -> None:
    """Entry point: run the app, turning a :class:`UserError` into one line on stderr and exit code 2."""
    transformers_logging.disable_progress_bar()
    try:
        app()
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank hits it: say it once
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
