"""``interlayer steer``: train → eval → analyze end to end on a tiny model, resume after kill -9, and the user
errors (one line, exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_after_checkpoint

from interlayer.steering.vectors import SteeringVectors, VectorsMeta

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_cli import assert_user_error, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "sums.jsonl"
    rows = [{"question": f"What is {a} plus {a + 3}? <b>", "answer": f"#### {2 * a + 3}"} for a in range(300)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_args(model: Path, task: Path, out: Path, *extra: str) -> list[str]:
    return [
        "steer", "train", "--model", str(model), "--task", str(task), "--out", str(out),
        "--steps", "3", "--prompts", "2", "--samples", "2", "--max-new-tokens", "3", "--lr", "0.05",
        "--checkpoint-every", "1", *extra,
    ]  # fmt: skip


def test_train_eval_analyze(
    tiny_models: dict[str, Path], problems_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_models["llama"]
    code, out, err = run_cli([*_train_args(model, problems_file, tmp_path / "run"), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["trainable_parameters"] == 3 * 32 and summary["optimizer_state_bytes"] == 4 + 2 * 4 * 96
    vectors = SteeringVectors.load(tmp_path / "run" / "vectors")
    assert vectors.meta.sites == ("layers.0", "layers.1", "layers.2")
    # a random model never writes "#### <answer>": every reward is −1, every advantage 0, so no update
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["reward"] for r in history] == [-1.0] * 3
    assert torch.equal(vectors.S, torch.zeros(3, 32))

    code, out, err = run_cli(
        ["steer", "eval", "--model", str(model), "--task", str(problems_file), "--problems", "8",
         "--samples", "2", "--vectors", str(tmp_path / "run"), "--max-new-tokens", "4", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    from interlayer.arithmetic import wilson_interval
    from interlayer.steering.tasks import load_task

    held_out = load_task(str(problems_file), train=0, validation=0, test=8).problems["test"]
    assert result["problems"] == len(held_out) > 0 and result["samples"] == 2
    # the random model never writes "#### <answer>": nothing is correct, and the interval is Wilson's for 0/n
    assert result["correct"] == 0 and result["sampled_accuracy"] == 0.0
    assert (result["ci_low"], result["ci_high"]) == wilson_interval(0, len(held_out))

    code, out, err = run_cli(
        ["steer", "analyze", "--model", str(model), "--vectors", str(tmp_path / "run"), "--task",
         str(problems_file), "--out", str(tmp_path / "analysis"), "--problems", "4", "--transfer-model",
         str(tiny_models["qwen2"]), "--transfer-problems", "3", "--max-new-tokens", "4", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    html = (tmp_path / "analysis" / "report.html").read_text()
    for title in ("Logit lens", "Persistence", "Token substitution", "Path patching", "Transfer"):
        assert title in html
    assert "<b>" not in html and "<script" not in html
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert [row["model"] for row in analysis["transfer"]] == [str(model), str(tiny_models["qwen2"])]
    assert analysis["path_patching"]["vector_site"] == "layers.1"


_TRAIN_SCRIPT = """
import sys
from interlayer.models import load_model
from interlayer.steering.tasks import Task, TaskProblem
from interlayer.steering.trainer import RLConfig, train_rl

def vowels(completion, problem):
    letters = [c for c in completion.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / max(len(letters), 1)

words = "the cat sat on a mat while dogs ran in the park under blue skies".split()
train = [TaskProblem(" ".join(words[i : i + 3]), "", f"toy#{i}") for i in range(len(words) - 3)]
lm = load_model(sys.argv[1])
cfg = RLConfig(steps=12, prompts_per_step=3, samples_per_prompt=3, lr=0.05, checkpoint_every=2)
train_rl(lm.model, lm.tokenizer, Task("toy", {"train": train}, vowels, 4), cfg, sys.argv[2], progress=False)
"""


def test_kill_9_then_rerun_gives_the_uninterrupted_vectors(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A dense reward (the share of vowels) so that every step moves the vectors; one thread in every run."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    model = str(tiny_models["llama"])
    subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, model, str(tmp_path / "whole")], env=env, check=True)
    args = [sys.executable, "-c", _TRAIN_SCRIPT, model, str(tmp_path / "cut")]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "cut" / "checkpoint" / "state.json"
    kill_after_checkpoint(process, state, 4)
    assert not (tmp_path / "cut" / "summary.json").exists()
    subprocess.run(args, env=env, check=True)
    a = SteeringVectors.load(tmp_path / "whole" / "vectors")
    b = SteeringVectors.load(tmp_path / "cut" / "vectors")
    assert torch.equal(a.S, b.S) and a.S.abs().sum() > 0


def test_user_errors(
    tiny_models: dict[str, Path], problems_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_models["llama"])
    wide = VectorsMeta("all", ("layers.0",), 64, 3, "other-model")
    SteeringVectors(wide).save(tmp_path / "wide")
    assert_user_error(
        run_cli(
            ["steer", "eval", "--model", model, "--vectors", str(tmp_path / "wide"), "--problems", "2"],
            capsys,
        ),
        "width 64",
        "this model has width 32",
    )
    deep = VectorsMeta("all", ("layers.0",), 32, 12, "other-model")
    SteeringVectors(deep).save(tmp_path / "deep")
    assert_user_error(
        run_cli(
            ["steer", "eval", "--model", model, "--vectors", str(tmp_path / "deep"), "--problems", "2"],
            capsys,
        ),
        "12 layers",
    )
    assert_user_error(
        run_cli([*_train_args(Path(model), problems_file, tmp_path / "s"), "--sites", "layers.9"], capsys),
        "unknown site 'layers.9'",
        "valid sites: embed, layers.0",
    )
    assert_user_error(
        run_cli(
            ["steer", "eval", "--model", model, "--task", str(problems_file), "--answer-field", "solution"],
            capsys,
        ),
        "no field 'solution'",
        "question, answer",
    )
    assert_user_error(
        run_cli(["steer", "eval", "--model", model, "--vectors", str(tmp_path / "none")], capsys),
        "no steering vectors in",
    )
    assert_user_error(
        run_cli([*_train_args(Path(model), problems_file, tmp_path / "m"), "--mode", "x"], capsys), "mode"
    )
