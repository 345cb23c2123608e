"""``interlayer steer``: train steering vectors with RL, evaluate them, and analyse what they do."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from interlayer.cli_common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, emit, print_table

if TYPE_CHECKING:  # imported where used at run time, to keep the CLI's start fast
    from interlayer.models import LoadedModel
    from interlayer.steering.tasks import Task
    from interlayer.steering.vectors import SteeringVectors

steer_app = typer.Typer(
    help="Steering vectors trained with RL (RLOO/GRPO), their evaluation and analysis.", no_args_is_help=True
)

TaskOpt = Annotated[
    str,
    typer.Option(
        "--task",
        help="arith (embedded word problems), gsm8k, math, or a local .jsonl/.json/.parquet/.csv or HF dataset id.",
    ),
]
QuestionFieldOpt = Annotated[
    str, typer.Option("--question-field", help="The question field of a file or hub dataset task.")
]
AnswerFieldOpt = Annotated[
    str, typer.Option("--answer-field", help="The answer field of a file or hub dataset task.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the problems drawn and the samples.")]
VectorsOpt = Annotated[Path, typer.Option("--vectors", help="A folder written by `steer train` (vectors/).")]


def _task(
    task: str,
    train: int,
    validation: int,
    test: int,
    seed: int,
    question: str,
    answer: str,
    max_new_tokens: int = 0,
) -> Task:
    """The task, with its completion length limit replaced by ``max_new_tokens`` when that is positive."""
    from dataclasses import replace

    from interlayer.errors import UserError
    from interlayer.steering.tasks import load_task

    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    loaded = load_task(
        task,
        train=train,
        validation=validation,
        test=test,
        seed=seed,
        question_field=question,
        answer_field=answer,
    )
    return replace(loaded, max_new_tokens=max_new_tokens) if max_new_tokens else loaded


def _load_vectors(path: Path, lm: LoadedModel) -> SteeringVectors:
    """The vectors in ``path`` (a run folder or its ``vectors/``), checked against the model, on its device."""
    from interlayer.steering.vectors import SteeringVectors

    folder = path / "vectors" if (path / "vectors" / "vectors.json").is_file() else path
    return SteeringVectors.load(folder, lm.model).to(lm.device)


@steer_app.command("train")
def train(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", help="Run folder (rerun to resume; --steps may grow).")],
    steps: Annotated[int, typer.Option("--steps", help="RL updates, one per rollout batch.")] = 100,
    mode: Annotated[
        str, typer.Option("--mode", help="vectors (one per layer), single, lowrank, full or lora.")
    ] = "vectors",
    sites: Annotated[
        str, typer.Option("--sites", help="Vector sites (default layers.*; single: the middle layer).")
    ] = "",
    rank: Annotated[int, typer.Option("--rank", help="r of --mode lowrank (S = A·B).")] = 2,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="r of --mode lora.")] = 4,
    algorithm: Annotated[
        str, typer.Option("--algorithm", help="rloo or grpo (no std normalisation).")
    ] = "rloo",
    kl: Annotated[float, typer.Option("--kl", help="β of the k3 KL penalty to the frozen model.")] = 0.0,
    lr: Annotated[
        float, typer.Option("--lr", help="Learning rate (0: vectors 1e-3, full 1e-6, lora 1e-4).")
    ] = 0.0,
    prompts: Annotated[int, typer.Option("--prompts", help="Prompts per step.")] = 16,
    samples: Annotated[int, typer.Option("--samples", help="G, completions per prompt.")] = 16,
    temperature: Annotated[float, typer.Option("--temperature", help="Rollout temperature.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="0: the task's limit.")] = 0,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Completions per backward pass.")] = 64,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")
    ] = 10,
    eval_every: Annotated[
        int, typer.Option("--eval-every", help="Greedy validation accuracy every N steps (0: never).")
    ] = 0,
    task: TaskOpt = "arith",
    train_problems: Annotated[
        int, typer.Option("--train-problems", help="Training problems (arith).")
    ] = 5000,
    question_field: QuestionFieldOpt = "question",
    answer_field: AnswerFieldOpt = "answer",
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Train steering vectors (or, for comparison, the full model or LoRA) with RLOO/GRPO on a verifiable task."""
    from interlayer.models import load_model
    from interlayer.steering.trainer import RLConfig, train_rl

    cfg = RLConfig(
        mode=mode,
        sites=sites,
        rank=rank,
        lora_rank=lora_rank,
        algorithm=algorithm,
        kl_coef=kl,
        lr=lr,
        steps=steps,
        prompts_per_step=prompts,
        samples_per_prompt=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        micro_batch=micro_batch,
        seed=seed,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
    )
    the_task = _task(
        task, train_problems, 100 if eval_every else 0, 0, seed, question_field, answer_field, max_new_tokens
    )
    lm = load_model(model, device=device, dtype=dtype)
    summary = train_rl(lm.model, lm.tokenizer, the_task, cfg, out, model_name=model)
    if not as_json:
        print_table(f"RL {mode} ({out})", [summary])
    emit(summary, as_json)


@steer_app.command("eval")
def evaluate(
    model: ModelOpt,
    vectors: Annotated[
        Path | None, typer.Option("--vectors", help="Steering vectors (a run folder or its vectors/).")
    ] = None,
    problems: Annotated[int, typer.Option("--problems", help="Held-out test problems.")] = 500,
    samples: Annotated[int, typer.Option("--samples", help="G samples per problem (0: greedy only).")] = 8,
    temperature: Annotated[float, typer.Option("--temperature", help="Temperature of the samples.")] = 1.0,
    split: Annotated[str, typer.Option("--split", help="test or validation.")] = "test",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="0: the task's limit.")] = 0,
    task: TaskOpt = "arith",
    question_field: QuestionFieldOpt = "question",
    answer_field: AnswerFieldOpt = "answer",
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Greedy accuracy with its Wilson interval, and sampled accuracy (mean over G samples per problem)."""
    from interlayer.errors import UserError
    from interlayer.models import load_model
    from interlayer.steering.evaluate import evaluate as run_eval

    if split not in ("test", "validation"):
        raise UserError(f"--split must be test or validation, got {split!r}")
    if samples < 0 or problems < 1 or temperature < 0:
        raise UserError(
            f"--samples must be >= 0, --problems >= 1 and --temperature >= 0 (0: greedy samples); got "
            f"{samples}, {problems}, {temperature}"
        )
    the_task = _task(
        task,
        0,
        problems if split == "validation" else 0,
        problems if split == "test" else 0,
        seed,
        question_field,
        answer_field,
        max_new_tokens,
    )
    held_out = the_task.problems.get(split, [])[:problems]
    if not held_out:
        raise UserError(f"task {the_task.name} has no {split} problems")
    lm = load_model(model, device=device, dtype=dtype)
    steering = _load_vectors(vectors, lm) if vectors is not None else None
    result = run_eval(
        lm.model,
        lm.tokenizer,
        held_out,
        the_task.verifier,
        the_task.max_new_tokens,
        steering,
        samples,
        temperature,
        seed,
    )
    summary = {k: v for k, v in asdict(result).items() if k != "examples"}
    summary |= {"model": model, "vectors": str(vectors) if vectors else None, "task": the_task.name}
    if not as_json:
        print_table(
            f"{the_task.name} {split}: {model}" + (f" + {vectors}" if vectors else ""),
            [
                {
                    "problems": result.problems,
                    "greedy accuracy": f"{result.accuracy:.3f}",
                    "95% interval": f"[{result.ci_low:.3f}, {result.ci_high:.3f}]",
                    f"sampled (G={samples}, T={temperature:g})": f"{result.sampled_accuracy:.3f}",
                }
            ],
        )
    emit(summary, as_json)


@steer_app.command("analyze")
def analyze(
    model: ModelOpt,
    vectors: Annotated[
        Path, typer.Option("--vectors", help="Steering vectors (a run folder or its vectors/).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder: report.html and analysis.json.")],
    problems: Annotated[int, typer.Option("--problems", help="Held-out problems the analyses run on.")] = 64,
    transfer_model: Annotated[
        list[str] | None,
        typer.Option("--transfer-model", help="Another model of the same width and depth (repeatable)."),
    ] = None,
    transfer_problems: Annotated[
        int, typer.Option("--transfer-problems", help="Problems of the transfer evaluation.")
    ] = 200,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="0: the task's limit.")] = 0,
    task: TaskOpt = "arith",
    question_field: QuestionFieldOpt = "question",
    answer_field: AnswerFieldOpt = "answer",
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Logit lens, persistence, token substitution at the last layer, path patching at the penultimate layer and
    transfer to other models, in report.html."""
    from interlayer.models import load_model
    from interlayer.steering.analysis_run import run_analysis

    the_task = _task(
        task, 0, 0, max(problems, transfer_problems), seed, question_field, answer_field, max_new_tokens
    )
    lm = load_model(model, device=device, dtype=dtype)
    steering = _load_vectors(vectors, lm)
    others: dict[str, tuple[Any, Any]] = {}
    for name in transfer_model or []:
        other = load_model(name, device=device, dtype=dtype)
        steering.check_model(other.model)
        others[name] = (other.model, other.tokenizer)
    summary = run_analysis(
        lm.model, lm.tokenizer, steering, the_task, out, problems, model, others, transfer_problems
    )
    if not as_json:
        print(f"report: {summary['report']}")
    emit(summary, as_json)
