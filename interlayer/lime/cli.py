"""``interlayer lime``: train LIMe against its baselines, analyse a LIMe model, convert a Llama model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from interlayer.cli_common import DataOpt, DeviceOpt, JsonOpt, emit, print_table

lime_app = typer.Typer(
    help="LIMe: attention over keys/values mixed from every earlier layer — train, analyse, convert.",
    no_args_is_help=True,
)


@lime_app.command("train")
def train_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run folder (rerun to resume; --steps may grow).")],
    data: DataOpt = "stdlib:code",
    tokenizer: Annotated[
        str, typer.Option("--tokenizer", help="Whose tokenizer the models use (a zoo model, folder, HF id).")
    ] = "zoo:code-lm",
    architectures: Annotated[
        str, typer.Option("--architectures", help="Comma-separated: lime, llama, lime-dynamic, denseformer.")
    ] = "lime,llama",
    layers: Annotated[int, typer.Option("--layers", help="Decoder blocks.")] = 8,
    d_model: Annotated[int, typer.Option("--d-model", help="Hidden size.")] = 128,
    heads: Annotated[int, typer.Option("--heads", help="Query heads.")] = 4,
    kv_heads: Annotated[int, typer.Option("--kv-heads", help="Key/value heads (divides --heads).")] = 4,
    intermediate: Annotated[int, typer.Option("--intermediate", help="SwiGLU MLP width.")] = 352,
    context_len: Annotated[int, typer.Option("--context-len", help="Tokens per context.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Contexts per step.")] = 16,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps.")] = 600,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate of the base model.")] = 1e-3,
    router_lr: Annotated[
        float, typer.Option("--router-lr", help="AdamW learning rate of the routers.")
    ] = 1e-2,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Base matrices' weight decay.")] = 0.1,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps.")] = 50,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between validation losses.")] = 100,
    val_contexts: Annotated[int, typer.Option("--val-contexts", help="Validation contexts scored.")] = 128,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")
    ] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the initial weights and every batch.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Train LIMe and the Llama baseline (same shape, tokens, batches, initial weights); writes training.html."""
    from interlayer.lime.train import LimeTrainConfig, train

    cfg = LimeTrainConfig(
        layers=layers,
        d_model=d_model,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        context_len=context_len,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        router_lr=router_lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        seed=seed,
        eval_every=eval_every,
        val_contexts=val_contexts,
        checkpoint_every=checkpoint_every,
    )
    names = tuple(part.strip() for part in architectures.split(",") if part.strip())
    summary = train(out, cfg, names, data=data, tokenizer_name=tokenizer)
    if not as_json:
        print_table(
            "validation loss (nats/token)",
            [
                {
                    k: run[k]
                    for k in ("architecture", "parameters", "val_loss", "train_flops", "seconds_per_step")
                }
                for run in summary["runs"].values()
            ],
        )
        print(f"curves: {out / 'training.html'}")
    emit(summary, as_json)


@lime_app.command("analyze")
def analyze_cmd(
    model: Annotated[str, typer.Option("--model", help="A LIMe folder (from `lime train`: RUN/lime/model).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.html and analysis.json.")],
    baseline: Annotated[
        str, typer.Option("--baseline", help="A causal LM to compare value entropy with (RUN/llama/model).")
    ] = "",
    data: DataOpt = "stdlib:code",
    contexts: Annotated[int, typer.Option("--contexts", help="Validation contexts scored.")] = 64,
    context_len: Annotated[int, typer.Option("--context-len", help="Tokens per context.")] = 128,
    alpha: Annotated[
        float, typer.Option("--alpha", help="Order α of the Rényi entropy (0.5: the paper's; 1: Shannon).")
    ] = 0.5,
    dynamic: Annotated[
        bool, typer.Option("--dynamic", help="Also average the per-token router (dynamic checkpoints).")
    ] = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Value entropy per layer (LIMe vs a baseline), router heatmap, expected retrieved layer → report.html."""
    from interlayer.lime.workflows import analyze

    summary = analyze(model, out, baseline, data, contexts, context_len, alpha, dynamic, device)
    if not as_json:
        print_table("value entropy per layer (nats)", summary["table"])
        print(f"report: {summary['report']}")
    emit(summary, as_json)


@lime_app.command("convert")
def convert_cmd(
    model: Annotated[
        str, typer.Option("--model", help="A Llama-architecture causal LM (zoo:code-lm, a folder).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the LIMe model.")],
    router: Annotated[str, typer.Option("--router", help="static or dynamic.")] = "static",
    as_json: JsonOpt = False,
) -> None:
    """A LIMe model with a Llama model's weights and identity routers (the same function until trained)."""
    from interlayer.lime.workflows import convert

    summary = convert(model, out, router)
    if not as_json:
        print(f"LIMe model: {summary['model']}")
    emit(summary, as_json)
