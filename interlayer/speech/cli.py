"""``interlayer varan``: fine-tune a speech encoder with VARAN or a baseline aggregation, evaluate a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from interlayer.cli_common import DeviceOpt, JsonOpt, emit, print_table

varan_app = typer.Typer(
    help="VARAN: fine-tune a speech encoder with one head per layer and a per-input posterior over layers.",
    no_args_is_help=True,
)

SpeechDataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="synth:styles (classification), synth:digits (CTC), a folder with metadata.jsonl, or hf:ID[:CONFIG].",
    ),
]
ResampleOpt = Annotated[
    bool, typer.Option("--resample", help="Resample audio at another rate to 16 kHz (else it is refused).")
]
LabelColumnOpt = Annotated[str, typer.Option("--label-column", help="hf: data's label column.")]
TextColumnOpt = Annotated[str, typer.Option("--text-column", help="hf: data's transcript column.")]
SplitsOpt = Annotated[
    str,
    typer.Option(
        "--splits", help="hf: data's names of train,validation,test (e.g. train.100,validation,test)."
    ),
]


def _split_names(splits: str) -> dict[str, str] | None:
    if not splits:
        return None
    names = [part.strip() for part in splits.split(",")]
    if len(names) != 3 or not all(names):
        raise typer.BadParameter("give three names: train,validation,test", param_hint="--splits")
    return dict(zip(("train", "validation", "test"), names, strict=True))


@varan_app.command("train")
def train_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run folder (rerun to resume; --steps may grow).")],
    model: Annotated[
        str, typer.Option("--model", help="A speech encoder: zoo:speech-w2v2, a folder or HF id.")
    ] = "zoo:speech-w2v2",
    data: SpeechDataOpt = "synth:styles",
    task: Annotated[str, typer.Option("--task", help="classification or ctc.")] = "classification",
    aggregation: Annotated[str, typer.Option("--aggregation", help="varan, last or weighted.")] = "varan",
    mode: Annotated[str, typer.Option("--mode", help="lora, full or frozen.")] = "lora",
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps.")] = 300,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per step.")] = 16,
    lr: Annotated[
        float, typer.Option("--lr", help="Encoder learning rate (0: 1e-3 with LoRA, 1e-4 full).")
    ] = 0.0,
    head_lr: Annotated[float, typer.Option("--head-lr", help="Heads' and posterior's learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.05,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps.")] = 15,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank (alpha = rank).")] = 16,
    prior: Annotated[
        str,
        typer.Option(
            "--prior",
            help="uniform, geometric, geometric_reversed, chi2 or chi2_reversed (official default).",
        ),
    ] = "chi2_reversed",
    prior_df: Annotated[float, typer.Option("--prior-df", help="χ² prior degrees of freedom.")] = 2.0,
    prior_nc: Annotated[float, typer.Option("--prior-nc", help="χ² prior non-centrality.")] = 10.0,
    prior_p: Annotated[float, typer.Option("--prior-p", help="Geometric prior p.")] = 0.45,
    beta: Annotated[float, typer.Option("--beta", help="Weight of the KL term.")] = 0.05,
    kl_direction: Annotated[
        str, typer.Option("--kl-direction", help="prior_q: KL(prior‖q), official; q_prior: KL(q‖prior).")
    ] = "prior_q",
    posterior_heads: Annotated[
        int, typer.Option("--posterior-heads", help="Attention heads of the posterior network.")
    ] = 16,
    train_size: Annotated[
        int, typer.Option("--train-size", help="Train clips (synth: to make; else a cap, 0 = all).")
    ] = 1200,
    val_size: Annotated[int, typer.Option("--val-size", help="Validation clips (as --train-size).")] = 200,
    test_size: Annotated[int, typer.Option("--test-size", help="Test clips (as --train-size).")] = 400,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between validations.")] = 100,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")
    ] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the heads, adapters and batches.")] = 0,
    resample: ResampleOpt = False,
    label_column: LabelColumnOpt = "label",
    text_column: TextColumnOpt = "text",
    splits: SplitsOpt = "",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a speech encoder (frozen, full or LoRA) with VARAN, last-layer or weighted-sum heads."""
    from interlayer.speech.train import VaranTrainConfig
    from interlayer.speech.workflows import train_run

    cfg = VaranTrainConfig(
        task=task,
        aggregation=aggregation,
        mode=mode,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        head_lr=head_lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        lora_rank=lora_rank,
        prior=prior,
        prior_df=prior_df,
        prior_nc=prior_nc,
        prior_p=prior_p,
        beta=beta,
        kl_direction=kl_direction,
        posterior_heads=posterior_heads,
        seed=seed,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
    )
    sizes = {"train": train_size, "validation": val_size, "test": test_size}
    summary = train_run(
        out, model, data, cfg, sizes, device, resample, label_column, text_column, _split_names(splits)
    )
    if not as_json:
        test = summary["test"]
        print_table("test", [{k: test[k] for k in ("clips", "accuracy", "cer", "wer") if k in test}])
        print(f"report: {out / 'report.html'}")
    emit(summary, as_json)


@varan_app.command("evaluate")
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="A varan train run folder.")],
    data: SpeechDataOpt = "synth:styles",
    split: Annotated[str, typer.Option("--split", help="train, validation or test.")] = "test",
    size: Annotated[int, typer.Option("--size", help="Clips (synth: to make; else a cap, 0 = all).")] = 400,
    resample: ResampleOpt = False,
    label_column: LabelColumnOpt = "label",
    text_column: TextColumnOpt = "text",
    split_name: Annotated[str, typer.Option("--split-name", help="hf: data's name for the split.")] = "",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Accuracy (classification) or CER/WER (CTC) of a trained run on a split, and its mean posterior."""
    from interlayer.speech.workflows import evaluate_run

    summary = evaluate_run(
        run, data, split, size, device, resample, label_column, text_column, split_name or None
    )
    if not as_json:
        print_table(
            f"{data} {split}", [{k: summary[k] for k in ("clips", "accuracy", "cer", "wer") if k in summary}]
        )
    emit(summary, as_json)
