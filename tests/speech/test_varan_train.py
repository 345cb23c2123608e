"""``interlayer varan train`` / ``evaluate``: a run end to end, save and load, resume after kill -9, learning,
and every bad input in one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_after_checkpoint
from safetensors.torch import load_file
from scipy.io import wavfile
from test_cli import assert_user_error, run_cli
from test_speech_data import speech_folder

from interlayer.speech.train import VaranTrainConfig
from interlayer.speech.workflows import train_run

SIZES = {"train": 24, "validation": 8, "test": 12}
SMALL = VaranTrainConfig(
    steps=8,
    batch_size=4,
    posterior_heads=4,
    eval_every=4,
    checkpoint_every=2,
    warmup_steps=0,
    eval_batch_size=8,
)


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "varan", "train", "--model", str(model), "--out", str(out), "--posterior-heads", "4",
        "--train-size", "24", "--val-size", "8", "--test-size", "12", "--batch-size", "4",
        "--eval-every", "4", "--checkpoint-every", "2", "--warmup-steps", "0", "--json", *extra,
    ]  # fmt: skip


def test_a_run_saves_a_model_that_evaluates_to_its_summary(
    tiny_speech: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(_args(tiny_speech, tmp_path / "run", "--steps", "8"), capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["outputs"] == ["angry", "calm", "excited", "sad"] and summary["layers"] == 3
    assert summary["test"]["clips"] == 12 and len(summary["test"]["mean_posterior"]) == 3
    assert sum(summary["test"]["mean_posterior"]) == pytest.approx(1.0, abs=1e-5)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {
        "model",
        "summary.json",
        "report.html",
        "history.json",
    }
    code, out, err = run_cli(["varan", "evaluate", str(tmp_path / "run"), "--size", "12", "--json"], capsys)
    assert code == 0, err
    evaluated = json.loads(out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == summary["test"]["accuracy"]
    assert evaluated["mean_posterior"] == pytest.approx(summary["test"]["mean_posterior"], abs=1e-6)


def test_kill_9_then_rerun_gives_the_uninterrupted_model(tiny_speech: Path, tmp_path: Path) -> None:
    assert torch.get_num_threads() == 1
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "interlayer", *_args(tiny_speech, tmp_path / "cut", "--steps", "30")]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    whole = train_run(
        tmp_path / "whole", str(tiny_speech), "synth:styles", replace(SMALL, steps=30), SIZES, progress=False
    )
    killed_at = kill_after_checkpoint(process, tmp_path / "cut" / "checkpoint" / "state.json", 4)
    assert 4 <= killed_at < 30 and not (tmp_path / "cut" / "model").exists()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["steps_run_now"] == 30 - killed_at
    a = load_file(str(tmp_path / "whole" / "model" / "trained.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "trained.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary["test"] == whole["test"]


@pytest.mark.parametrize("aggregation", ["varan", "weighted", "last"])
def test_ctc_training_lowers_the_loss(tiny_speech: Path, tmp_path: Path, aggregation: str) -> None:
    cfg = replace(
        SMALL, task="ctc", aggregation=aggregation, mode="full", steps=40, eval_every=40, head_lr=3e-3
    )
    summary = train_run(tmp_path / "ctc", str(tiny_speech), "synth:digits", cfg, SIZES, progress=False)
    history = json.loads((tmp_path / "ctc" / "history.json").read_text())
    first, last = np.mean([r["loss"] for r in history[:5]]), np.mean([r["loss"] for r in history[-5:]])
    assert last < 0.8 * first, (first, last)
    assert summary["outputs"][:2] == ["<blank>", " "] and "wer" in summary["test"]
    if aggregation == "weighted":
        assert len(summary["weighted_sum"]) == 3 and summary["weighted_sum"] != [1 / 3] * 3


def test_bad_input_ends_in_one_line(
    tiny_speech: Path, tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(_args(tiny_models["llama"], tmp_path / "text"), capsys)
    assert_user_error(result, "is a text model (LlamaForCausalLM), not a speech encoder")
    folder = speech_folder(
        tmp_path / "data", {"train": ["calm", "sad"] * 3, "validation": ["sad"], "test": ["calm"]}
    )
    wavfile.write(folder / "train-0.wav", 8000, (np.sin(np.arange(8000) / 3) * 9000).astype(np.int16))
    result = run_cli(_args(tiny_speech, tmp_path / "rate", "--data", str(folder)), capsys)
    assert_user_error(
        result, "train-0.wav: the audio is at 8000 Hz, the model takes 16000 Hz; pass --resample"
    )
    wavfile.write(folder / "train-0.wav", 16000, np.zeros(8000, np.int16))
    assert_user_error(
        run_cli(_args(tiny_speech, tmp_path / "silent", "--data", str(folder)), capsys), "is silent"
    )
    wavfile.write(folder / "train-0.wav", 16000, np.zeros(0, np.int16))
    assert_user_error(
        run_cli(_args(tiny_speech, tmp_path / "empty", "--data", str(folder)), capsys), "is empty"
    )
    code, _, err = run_cli(_args(tiny_speech, tmp_path / "run", "--steps", "2"), capsys)
    assert code == 0, err
    other = speech_folder(tmp_path / "other", {"test": ["calm", "excited"]})
    (other / "metadata.jsonl").write_text(
        (other / "metadata.jsonl").read_text().replace('"excited"', '"happy"')
    )
    result = run_cli(["varan", "evaluate", str(tmp_path / "run"), "--data", str(other)], capsys)
    assert_user_error(
        result, "labels ['happy'] are not among the head's labels ['angry', 'calm', 'excited', 'sad']"
    )
    result = run_cli(_args(tiny_speech, tmp_path / "run", "--steps", "2", "--aggregation", "last"), capsys)
    assert_user_error(result, "holds a run with")
    # how often a run validates or checkpoints does not change its weights: a rerun may change it
    code, _, err = run_cli(_args(tiny_speech, tmp_path / "run", "--steps", "3", "--eval-every", "1"), capsys)
    assert code == 0, err
    assert_user_error(
        run_cli(_args(tiny_speech, tmp_path / "x", "--mode", "half"), capsys), "unknown mode 'half'"
    )
    short = speech_folder(
        tmp_path / "short", {"train": ["calm", "sad"] * 3, "validation": ["sad"], "test": ["calm"]}
    )
    wavfile.write(short / "test-0.wav", 16000, (np.sin(np.arange(100) / 3) * 9000).astype(np.int16))
    result = run_cli(_args(tiny_speech, tmp_path / "short-run", "--data", str(short)), capsys)
    assert_user_error(result, "test clip 0: 100 samples is shorter than the encoder's receptive field")
    empty = speech_folder(tmp_path / "empty-split", {"train": ["calm"]})
    result = run_cli(
        ["varan", "evaluate", str(tmp_path / "run"), "--data", str(empty), "--split", "test"], capsys
    )
    assert_user_error(result, "the test split has no clips")
    result = run_cli(
        _args(tiny_speech, tmp_path / "prior", "--prior", "geometric", "--prior-p", "1.5"), capsys
    )
    assert_user_error(result, "the geometric prior's p must be in (0, 1)")


def test_ctc_refuses_a_transcript_its_frames_cannot_hold(tiny_speech: Path, tmp_path: Path) -> None:
    from interlayer.errors import UserError
    from interlayer.speech.corpus import SpeechSet
    from interlayer.speech.train import encode
    from interlayer.speech.workflows import load_encoder

    encoder, _ = load_encoder(str(tiny_speech), "cpu")
    wave = np.sin(np.arange(1600) / 3.0).astype(np.float32)  # 1600 samples: 5 frames
    names = ["<blank>", "1", "2"]
    assert len(encode("ctc", SpeechSet("s", [wave], ["12121"]), names, "test", encoder).targets[0]) == 5
    with pytest.raises(
        UserError, match=r"5 encoder frames cannot hold its transcript '1122' \(CTC needs 6\)"
    ):
        encode("ctc", SpeechSet("s", [wave], ["1122"]), names, "test", encoder)


def test_a_run_refuses_a_base_model_whose_weights_changed(tiny_speech: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    from interlayer.errors import UserError
    from interlayer.speech.workflows import load_trained

    base = tmp_path / "base"
    shutil.copytree(tiny_speech, base)
    train_run(tmp_path / "run", str(base), "synth:styles", replace(SMALL, steps=1), SIZES, progress=False)
    assert load_trained(tmp_path / "run")[0].layers == 3
    state = load_file(str(base / "model.safetensors"))
    state["encoder.layers.0.feed_forward.output_dense.bias"] += 1
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="is not the one this run was trained on"):
        load_trained(tmp_path / "run")
