"""``interlayer sae``: train and evaluate sparse autoencoders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from interlayer.cli_common import (
    ChunkOpt,
    ContextOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelBatchOpt,
    OutlierOpt,
    emit,
    table,
)
from interlayer.errors import UserError
from interlayer.progress import progress_bar, stderr_console

sae_app = typer.Typer(help="Sparse autoencoders: train and evaluate.", no_args_is_help=True)


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
    from interlayer.sae.training_run import train_from_source
    from interlayer.sources import activation_source

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
        stderr_console.print(table(f"trained SAEs in {out}", rows))
    emit({"out": str(out), **metrics}, as_json)


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
            table(f"SAE metrics on {data} (validation)", [{"site": s, **m} for s, m in results.items()])
        )
    emit({"model": model, "data": data, "outlier_norm": outlier_norm, "sites": results}, as_json)
