"""``interlayer diffusion``: masked diffusion LMs — train, sample with any registered sampler, train G-Star's
remasker, and evaluate samplers side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from interlayer.cli_common import DataOpt, DeviceOpt, DtypeOpt, JsonOpt, emit, int_list, print_table

diffusion_app = typer.Typer(
    help="Masked diffusion LMs: MDLM training, samplers (MDLM, LLaDA, ReMDM, Star+, G-Star), the remasker, evaluation.",
    no_args_is_help=True,
)

DenoiserOpt = Annotated[
    str,
    typer.Option("--denoiser", help="A masked LM: zoo:code-mdlm, a folder from `diffusion train`, an HF id."),
]
AdapterOpt = Annotated[
    str, typer.Option("--adapter", help="auto, masked_lm, llada or dream (logits shifted by one).")
]
RemoteOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run the checkpoint's own modelling code (LLaDA, Dream).")
]
RemaskerOpt = Annotated[
    Path | None,
    typer.Option("--remasker", help="A folder from `diffusion train-remasker` (needed by gstar)."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed: sample i uses the generator of (seed, i).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Denoising steps N.")]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", help="Temperature of the x̂0 proposal (0: argmax).")
]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus mass of the x̂0 proposal (1: off).")]
ScheduleOpt = Annotated[
    str, typer.Option("--schedule", help="Star samplers: hybrid, loop or star (every step).")
]
TOnOpt = Annotated[float, typer.Option("--t-on", help="Hybrid schedule: star steps for t ≤ t_on, in (0, 1].")]
EtaOpt = Annotated[
    float | None, typer.Option("--eta", help="ReMDM η (default 0.008 cap, 0.015 rescale, 0.02 loop).")
]
BlockOpt = Annotated[
    int, typer.Option("--block-length", help="LLaDA: generated tokens per block (0: one block).")
]
LengthOpt = Annotated[
    int, typer.Option("--length", help="Sequence length (0: the denoiser's maximum positions).")
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", help="Samples per batch (does not change the samples).")
]


def _sampler_config(**fields: Any) -> Any:
    from interlayer.diffusion.samplers import SamplerConfig

    return SamplerConfig(**fields)


def _denoiser(name: str, device: str, dtype: str, adapter: str, remote: bool) -> tuple[Any, Any]:
    from interlayer.diffusion.denoiser import load_denoiser

    return load_denoiser(name, device=device, dtype=dtype, adapter=adapter, trust_remote_code=remote)


def _length(denoiser: Any, length: int) -> int:
    from interlayer.errors import UserError

    limit = int(getattr(denoiser.network.config, "max_position_embeddings", 0) or 0)
    if length < 0:
        raise UserError(f"--length must be at least 1, got {length}")
    if limit and length > limit:
        raise UserError(f"--length {length} exceeds the denoiser's {limit} positions")
    return length or limit or 128


def _remasker(folder: Path | None, denoiser: Any) -> Any:
    if folder is None:
        return None
    from interlayer.diffusion.remasker import load_remasker

    return load_remasker(folder, denoiser)


@diffusion_app.command("samplers")
def list_samplers() -> None:
    """The registered samplers."""
    from interlayer.diffusion.samplers import SAMPLERS

    print_table("samplers", [{"sampler": name, "what": info.description} for name, info in SAMPLERS.items()])


@diffusion_app.command("sample")
def sample_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for samples.jsonl and summary.json.")],
    denoiser: DenoiserOpt = "zoo:code-mdlm",
    sampler: Annotated[str, typer.Option("--sampler", help="See `interlayer diffusion samplers`.")] = "mdlm",
    steps: StepsOpt = 128,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples to draw.")] = 16,
    length: LengthOpt = 0,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="Text the samples start from (repeat for several).")
    ] = None,
    suffix: Annotated[str, typer.Option("--suffix", help="Text the samples end with (infilling).")] = "",
    gen_tokens: Annotated[
        int,
        typer.Option(
            "--gen-tokens", help="Tokens to generate per sample (0: fill --length); rows are padded."
        ),
    ] = 0,
    remasker: RemaskerOpt = None,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 0.9,
    schedule: ScheduleOpt = "hybrid",
    t_on: TOnOpt = 0.3,
    eta: EtaOpt = None,
    block_length: BlockOpt = 0,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 64,
    adapter: AdapterOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Draw samples with one sampler; each line of samples.jsonl holds a sample's text, ids and NFE."""
    from interlayer import atomic
    from interlayer.diffusion.samplers import sample
    from interlayer.diffusion.templates import build_templates, decode_samples

    config = _sampler_config(
        sampler=sampler,
        steps=steps,
        temperature=temperature,
        top_p=top_p,
        schedule=schedule,
        t_on=t_on,
        eta=eta,
        block_length=block_length,
    )
    den, tokenizer = _denoiser(denoiser, device, dtype, adapter, trust_remote_code)
    size = _length(den, length)
    template, attention = build_templates(
        tokenizer, den.mask_id, num_samples, size, prompt or [], suffix, gen_tokens
    )
    result = sample(
        den, config, template, attention, seed, batch_size, _remasker(remasker, den), progress=True
    )
    texts, ids = decode_samples(tokenizer, result.tokens_NL, result.attention_NL)
    lines = [
        {"text": text, "ids": row, "nfe": int(nfe), "remasker_nfe": int(rnfe)}
        for text, row, nfe, rnfe in zip(
            texts, ids, result.nfe_N.tolist(), result.remasker_nfe_N.tolist(), strict=True
        )
    ]
    import json

    atomic.write_text(out / "samples.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    summary = {
        "denoiser": denoiser,
        "sampler": config.label(),
        "steps": steps,
        "samples": num_samples,
        "seed": seed,
        "nfe": float(result.nfe_N.float().mean()),
        "remasker_nfe": float(result.remasker_nfe_N.float().mean()),
        "seconds": result.seconds,
        "network_seconds": result.network_seconds,
        "config": result.config,
        "out": str(out),
    }
    atomic.write_json(out / "summary.json", summary)
    if not as_json:
        for text in texts[:3]:
            typer.echo(f"--- {text}")
    emit(summary, as_json)


@diffusion_app.command("train")
def train_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="Run folder (rerun to resume); the model lands in out/model.")
    ],
    data: DataOpt = "stdlib:code",
    init: Annotated[
        str, typer.Option("--init", help="A masked LM to continue from (empty: a new model).")
    ] = "",
    tokenizer: Annotated[
        str, typer.Option("--tokenizer", help="Tokenizer of a new model ([MASK] is added when missing).")
    ] = "zoo:code-lm",
    d_model: Annotated[int, typer.Option("--d-model", help="Hidden size of a new model.")] = 192,
    layers: Annotated[int, typer.Option("--layers", help="Blocks of a new model.")] = 4,
    heads: Annotated[int, typer.Option("--heads", help="Attention heads of a new model.")] = 4,
    intermediate: Annotated[int, typer.Option("--intermediate", help="MLP width of a new model.")] = 512,
    context_len: Annotated[int, typer.Option("--context-len", help="Tokens per context.")] = 64,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Contexts per step.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate.")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps.")] = 100,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")
    ] = 200,
    eval_every: Annotated[
        int, typer.Option("--eval-every", help="Steps between validation NELBOs (0: end).")
    ] = 0,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Train a masked diffusion LM with the MDLM objective (log-linear schedule, SUBS)."""
    from interlayer.diffusion.train import DenoiserTrainConfig, train_denoiser

    cfg = DenoiserTrainConfig(
        d_model=d_model,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        context_len=context_len,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        seed=seed,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
    )
    summary = train_denoiser(out, data, cfg, init=init, tokenizer_name=tokenizer)
    if not as_json:
        typer.echo(
            f"validation NELBO {summary.get('val_nelbo', float('nan')):.3f} nats/token; model in {out / 'model'}"
        )
    emit(summary, as_json)


@diffusion_app.command("train-remasker")
def train_remasker_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run folder (rerun to resume; --steps may grow).")],
    denoiser: DenoiserOpt = "zoo:code-mdlm",
    data: DataOpt = "stdlib:code",
    init: Annotated[
        str, typer.Option("--init", help="all (blocks fine-tuned), first (--layers blocks) or head.")
    ] = "all",
    layers: Annotated[int, typer.Option("--layers", help="Blocks kept with --init first.")] = 1,
    loss: Annotated[
        str, typer.Option("--loss", help="bce, balanced (class-balanced BCE) or ranking.")
    ] = "bce",
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps.")] = 400,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Contexts per step.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate.")] = 1e-4,
    context_len: Annotated[
        int, typer.Option("--context-len", help="0: the denoiser's maximum positions.")
    ] = 0,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")
    ] = 100,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between validation P/R/F1.")] = 100,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Train G-Star's error predictor for a denoiser; logs precision, recall and F1 of error detection."""
    from interlayer.diffusion.remasker import RemaskerConfig
    from interlayer.diffusion.train import train_remasker

    cfg = RemaskerConfig(
        init=init,
        layers=layers,
        loss=loss,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
    )
    den, tokenizer = _denoiser(denoiser, device, "float32", "auto", False)
    summary = train_remasker(den, tokenizer, out, data, cfg, context_len)
    if not as_json:
        typer.echo(
            f"validation precision {summary['val_precision']:.3f} recall {summary['val_recall']:.3f} "
            f"F1 {summary['val_f1']:.3f}; remasker in {out}"
        )
    emit(summary, as_json)


@diffusion_app.command("eval")
def eval_cmd(
    denoiser: DenoiserOpt = "zoo:code-mdlm",
    samplers: Annotated[
        str, typer.Option("--samplers", help="Comma-separated sampler names.")
    ] = "mdlm,star,gstar",
    steps: Annotated[str, typer.Option("--steps", help="Comma-separated step counts.")] = "16,32",
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples per cell.")] = 64,
    length: LengthOpt = 0,
    scorer: Annotated[
        str, typer.Option("--scorer", help="Causal LM for generative perplexity (empty: none).")
    ] = "zoo:code-lm",
    remasker: RemaskerOpt = None,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 0.9,
    schedule: ScheduleOpt = "hybrid",
    t_on: TOnOpt = 0.3,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 64,
    out: Annotated[Path | None, typer.Option("--out", help="Write results.json here.")] = None,
    mauve_features: Annotated[
        str,
        typer.Option(
            "--mauve-features",
            help="Also MAUVE against --data's validation texts, with this feature model (needs mauve-text).",
        ),
    ] = "",
    data: DataOpt = "stdlib:code",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Every sampler at every step count on the same seeds: gen. perplexity, entropy, validity, NFE, time."""
    import importlib.util

    import torch

    from interlayer import atomic
    from interlayer.diffusion.evaluate import evaluate_grid
    from interlayer.errors import UserError
    from interlayer.models import load_model

    step_counts = list(int_list(steps, "--steps") or ())
    if not any(name.strip() for name in samplers.split(",")):
        raise UserError(f"--samplers takes comma-separated sampler names, got {samplers!r}")
    configs = [
        _sampler_config(
            sampler=name.strip(),
            steps=max(step_counts),
            temperature=temperature,
            top_p=top_p,
            schedule=schedule,
            t_on=t_on,
        )
        for name in samplers.split(",")
        if name.strip()
    ]
    for n in step_counts:
        _sampler_config(sampler=configs[0].sampler, steps=n)
    if remasker is None and any(c.info.strategy == "learned" for c in configs):
        raise UserError(
            "gstar needs a remasker (--remasker FOLDER, from `interlayer diffusion train-remasker`)"
        )
    scoring = load_model(scorer, device=device) if scorer else None
    if scoring is not None and scoring.head != "causal_lm":
        raise UserError(f"--scorer {scorer!r} is a {scoring.head.replace('_', ' ')}; it must be a causal LM")
    if mauve_features and importlib.util.find_spec("mauve") is None:
        raise UserError("--mauve-features needs the optional package mauve-text (pip install mauve-text)")
    den, tokenizer = _denoiser(denoiser, device, "float32", "auto", False)
    size = _length(den, length)
    references: list[str] = []
    if mauve_features:
        from interlayer.data import packed_contexts
        from interlayer.diffusion.templates import decode_samples

        held_out = packed_contexts(tokenizer, data, "validation", size, num_samples)
        references = decode_samples(tokenizer, held_out, torch.ones_like(held_out))[0]
    rows = evaluate_grid(
        den,
        tokenizer,
        configs,
        step_counts,
        num_samples,
        size,
        scoring,
        _remasker(remasker, den),
        seed,
        batch_size,
        mauve_references=references,
        mauve_features=mauve_features or None,
    )
    summary = {
        "denoiser": denoiser,
        "scorer": scorer,
        "samples_per_cell": num_samples,
        "seed": seed,
        "rows": rows,
    }
    if out is not None:
        atomic.write_json(out / "results.json", summary)
    if not as_json:
        keys = (
            "sampler",
            "steps",
            "gen_ppl",
            "entropy",
            "diversity",
            "python_validity",
            "nfe",
            "remasker_nfe",
            "seconds_per_sample",
        )
        print_table("samplers", [{k: row.get(k) for k in keys} for row in rows])
    emit(summary, as_json)
