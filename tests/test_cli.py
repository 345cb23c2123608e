"""The command line: every user mistake is one line on stderr with exit code 2; training survives kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interlayer.cli import main

TEXT = (
    "The json module encodes and decodes JavaScript Object Notation. Its dump and load functions work on "
    "files, while dumps and loads work on strings. Sorting keys makes the output deterministic, which helps "
    "when comparing files in version control and when caching results across runs of a program. "
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + TEXT * 3)
    return folder


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``interlayer ARGS`` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    old_argv = sys.argv
    sys.argv = ["interlayer", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old_argv
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result: tuple[int, str, str], *needles: str) -> str:
    code, _out, err = result
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sae", "train", "--model", str(model), "--data", str(data), "--out", str(out), "--sites", "layers.1",
        "--latents", "64", "--k", "8", "--batch-size", "128", "--context-len", "32", "--model-batch-size", "8",
        "--chunk-batches", "2", *extra,
    ]  # fmt: skip


def test_unknown_site_lists_valid_ones(tiny_models, corpus, tmp_path, capsys):
    line = assert_user_error(
        run_cli(train_args(tiny_models["llama"], corpus, tmp_path / "r", "--sites", "layers.9"), capsys),
        "unknown site 'layers.9'",
    )
    assert "layers.0.mlp" in line and "embed" in line


def test_missing_model_and_data_paths(tiny_models, corpus, tmp_path, capsys):
    assert_user_error(run_cli(["sites", "--model", str(tmp_path / "nope")], capsys), "model folder not found")
    assert_user_error(
        run_cli(train_args(tiny_models["llama"], tmp_path / "missing.txt", tmp_path / "r"), capsys),
        "missing.txt",
    )


def test_empty_data(tiny_models, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    assert_user_error(
        run_cli(train_args(tiny_models["llama"], empty, tmp_path / "r"), capsys), "no documents"
    )


def test_k_larger_than_latents(tiny_models, corpus, tmp_path, capsys):
    args = train_args(tiny_models["llama"], corpus, tmp_path / "r") + ["--k", "100"]
    assert_user_error(run_cli(args, capsys), "k (100) must not exceed latents (64)")


def test_nan_activations_name_site_and_chunk(tiny_models, corpus, tmp_path, capsys):
    broken = tmp_path / "broken"
    subprocess_free_copy(tiny_models["llama"], broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][:] = float("nan")
    save_file(weights, broken / "model.safetensors")
    line = assert_user_error(run_cli(train_args(broken, corpus, tmp_path / "r"), capsys), "NaN")
    assert "layers.1" in line and "chunk 0" in line


def subprocess_free_copy(src: Path, dst: Path) -> None:
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())


def test_sae_that_does_not_fit_the_model(tiny_models, corpus, tmp_path, capsys):
    from interlayer.sae import SAEConfig, TopKSAE, save_sae

    sae = TopKSAE(SAEConfig(d_in=16, latents=32, k=4, site="layers.1", model=str(tiny_models["llama"])))
    sae.initialise_(torch.Generator().manual_seed(0))
    save_sae(sae, tmp_path / "sae")
    args = [
        "sae",
        "eval",
        "--sae",
        str(tmp_path / "sae"),
        "--data",
        str(corpus),
        "--tokens",
        "100",
        "--context-len",
        "32",
    ]
    assert_user_error(run_cli(args, capsys), "d_in 16", "width 32")


def test_train_then_eval_json(tiny_models, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        train_args(tiny_models["llama"], corpus, out, "--tokens", "1024", "--json"), capsys
    )
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["tokens"] == 1024 and set(summary["sites"]) == {"layers.1"}
    cfg = json.loads((out / "layers.1" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["latents"], cfg["k"], cfg["site"]) == (32, 64, 8, "layers.1")
    args = [
        "sae",
        "eval",
        "--sae",
        str(out),
        "--data",
        str(corpus),
        "--tokens",
        "300",
        "--context-len",
        "32",
        "--json",
    ]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    metrics = json.loads(stdout.strip().splitlines()[-1])["sites"]["layers.1"]
    assert metrics["l0"] == pytest.approx(8.0)
    assert metrics["delta_ce"] == pytest.approx(metrics["ce_sae"] - metrics["ce_clean"])
    assert 0 < metrics["explained_variance"] <= 1


def test_kill_minus_nine_then_resume_equals_uninterrupted(tiny_models, corpus, tmp_path):
    """kill -9 mid-run, rerun the same command: it finishes with the weights of an uninterrupted run."""
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    extra = ("--tokens", str(128 * 40), "--checkpoint-seconds", "0", "--seed", "3")

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "interlayer", *train_args(tiny_models["llama"], corpus, out, *extra)]

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    subprocess.run(command(reference), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(command(resumed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (resumed / "checkpoint" / "state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (resumed / "metrics.json").exists(), "the run finished before it could be killed"
    assert (resumed / "checkpoint" / "state.json").exists()
    subprocess.run(command(resumed), check=True, env=env, capture_output=True)
    want = load_file(reference / "layers.1" / "sae.safetensors")
    got = load_file(resumed / "layers.1" / "sae.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_unknown_device(tiny_models, capsys):
    assert_user_error(
        run_cli(["sites", "--model", str(tiny_models["llama"]), "--device", "gpu"], capsys), "unknown device"
    )


def test_folder_that_is_not_a_cache(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"name": "something else"}')
    args = [
        "sae",
        "train",
        "--activations",
        str(tmp_path),
        "--out",
        str(tmp_path / "r"),
        "--latents",
        "8",
        "--k",
        "2",
    ]
    assert_user_error(run_cli(args, capsys), "is not an activation cache")


def test_two_saes_for_one_site(tiny_models, corpus, tmp_path, capsys):
    from interlayer.sae import SAEConfig, TopKSAE, save_sae

    for name in ("a", "b"):
        sae = TopKSAE(SAEConfig(d_in=32, latents=16, k=2, site="layers.1", model=str(tiny_models["llama"])))
        sae.initialise_(torch.Generator().manual_seed(0))
        save_sae(sae, tmp_path / "runs" / name)
    args = ["sae", "eval", "--sae", str(tmp_path / "runs"), "--data", str(corpus), "--tokens", "50"]
    assert_user_error(run_cli(args, capsys), "two SAEs for site layers.1")


def test_out_is_a_file(tiny_models, corpus, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    line = assert_user_error(run_cli(train_args(tiny_models["llama"], corpus, tmp_path / "taken"), capsys))
    assert "taken" in line
