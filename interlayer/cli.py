"""The ``interlayer`` command line (also ``python -m interlayer``).

Every mistake a user can make ends in one line on stderr and exit code 2 (:class:`~interlayer.errors.UserError`);
long commands show a progress bar on stderr, resume from their output folder, and with ``--json`` print a
machine-readable summary as the last line of stdout. What a command produces (its table, the report's path)
goes to stdout (:func:`~interlayer.cli_common.print_table`), so that ``| grep`` sees it; with ``--json`` the
JSON line replaces it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from transformers.utils import logging as transformers_logging

from interlayer.activations import ChunkPlan
from interlayer.cli_common import (
    ChunkOpt,
    ContextOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelBatchOpt,
    ModelOpt,
    SitesOpt,
    emit,
    print_table,
)
from interlayer.diffusion.cli import diffusion_app
from interlayer.errors import UserError
from interlayer.flow.cli import flow_app
from interlayer.lime.cli import lime_app
from interlayer.progress import progress_bar
from interlayer.sae.cli import sae_app
from interlayer.speech.cli import varan_app
from interlayer.steering.cli import steer_app

app = typer.Typer(
    help="Work inside the layers of transformers.", no_args_is_help=True, pretty_exceptions_show_locals=False
)
activations_app = typer.Typer(help="Activations at sites: cache them on disk.", no_args_is_help=True)
zoo_app = typer.Typer(help="Tiny reference models trained here: list and build them.", no_args_is_help=True)
app.add_typer(sae_app, name="sae")
app.add_typer(activations_app, name="activations")
app.add_typer(zoo_app, name="zoo")
app.add_typer(flow_app, name="flow")
app.add_typer(steer_app, name="steer")
app.add_typer(diffusion_app, name="diffusion")
app.add_typer(lime_app, name="lime")
app.add_typer(varan_app, name="varan")


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
        print_table(f"sites of {model}", rows)
    emit({"model": model, "sites": rows}, as_json)


@activations_app.command("cache")
def activations_cache(
    model: ModelOpt,
    sites: SitesOpt,
    out: Annotated[Path, typer.Option("--out", help="Cache folder (rerun to resume).")],
    data: DataOpt = "stdlib:docs",
    tokens: Annotated[int, typer.Option("--tokens", help="Kept tokens to cache.")] = 1_000_000,
    context_len: ContextOpt = ChunkPlan.context_len,
    model_batch_size: ModelBatchOpt = ChunkPlan.batch_size,
    chunk_batches: ChunkOpt = ChunkPlan.batches_per_chunk,
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
    emit(
        {
            "out": str(out),
            "sites": cache.sites,
            "tokens": cache.manifest["tokens"],
            "shards": len(cache.manifest["shards"]),
        },
        as_json,
    )


@zoo_app.command("list")
def zoo_list(as_json: JsonOpt = False) -> None:
    """List the zoo's models: corpus, parameters, whether built, and validation figures once built."""
    from interlayer.zoo import entries, zoo_dir

    rows = entries()
    if not as_json:
        shown = [{k: v for k, v in row.items() if k != "description"} for row in rows]
        print_table(f"zoo models (cache: {zoo_dir()})", shown)
    emit({"zoo": str(zoo_dir()), "models": rows}, as_json)


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
        figures = (
            "parameters",
            "steps",
            "val_loss",
            "val_ppl",
            "unigram_ppl",
            "bigram_ppl",
            "heldout_contrastive_loss",
            "build_seconds",
        )
        print_table(
            f"zoo:{manifest['name']} in {folder}",
            [{"name": manifest["name"]} | {k: summary[k] for k in figures if k in summary}],
        )
    emit(summary, as_json)


@app.command()
def demo(
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller run (smaller SAEs, fewer tokens).")
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Output folder (report.html, SAEs).")] = Path(
        "interlayer-demo"
    ),
    stages: Annotated[
        str,
        typer.Option(
            "--stages",
            help="Stages, comma-separated: sae, budgets, flow, steering (opt-in: RL on zoo:arith-lm), diffusion (opt-in: zoo:code-mdlm samplers), lime (opt-in: LIMe vs Llama trained here), varan (opt-in: VARAN vs last layer on synthesised speech).",
        ),
    ] = "sae,budgets,flow",
    as_json: JsonOpt = False,
) -> None:
    """Train and evaluate SAEs at every MiniLM site on stdlib docstrings, match and trace features across
    layers; write report.html."""
    from interlayer.demo import DemoConfig, run_demo

    chosen = tuple(name.strip() for name in stages.split(",") if name.strip())
    summary = run_demo(DemoConfig.preset(quick, out, chosen))
    if not as_json:
        print(f"report: {summary['report']}")
    emit(summary, as_json)


def main() -> None:
    """Entry point: run the app, turning a :class:`UserError` into one line on stderr and exit code 2."""
    transformers_logging.disable_progress_bar()
    try:
        app()
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank hits it: say it once
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
