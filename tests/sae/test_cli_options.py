"""The ``sae train`` flags come from the config dataclasses (no default written twice), and every bad
architecture setting is one clear line with exit code 2."""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch

from interlayer.sae import ARCHITECTURES, TrainConfig, make_config, save_sae
from interlayer.sae.architectures import build_sae
from interlayer.sae.cli import OWN_COMMANDS, sae_eval, sae_train
from interlayer.sae.config import SAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_cli import run_cli  # noqa: E402

NOT_FLAGS = {
    "d_in", "architecture", "site", "model", "normalisation", "input_scale", "version", "source_format", "source_site"
}  # fmt: skip
"""Config fields the run fills in (from the site, the model and the normalisation), not the user."""


def _params() -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(sae_train).parameters)


def test_every_train_config_field_has_a_flag_with_the_same_default() -> None:
    params = _params()
    for f in fields(TrainConfig):
        assert f.name in params, f"TrainConfig.{f.name} has no --{f.name.replace('_', '-')} flag"
        assert params[f.name].default == f.default, f"--{f.name} default differs from TrainConfig"


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_architecture_field_has_a_flag(architecture: str) -> None:
    if architecture in OWN_COMMANDS:
        pytest.skip(
            f"{architecture} SAEs are trained by `{OWN_COMMANDS[architecture]}`, which sets its fields"
        )
    params = _params()
    for f in fields(ARCHITECTURES[architecture].config_class):
        if f.name in NOT_FLAGS:
            continue
        assert f.name in params, f"{architecture}: config field {f.name} has no flag"
        if f.default is MISSING:  # required fields (latents, k) have no default on the flag either
            assert params[f.name].default in (inspect.Parameter.empty, None), f.name
        else:  # None means "the architecture's own default", so none is restated
            assert params[f.name].default is None, f"--{f.name} restates a default"


def test_chunk_plan_flags_have_its_defaults() -> None:
    from interlayer.activations import ChunkPlan

    params = _params()
    flags = {
        "context_len": "context_len",
        "batch_size": "model_batch_size",
        "batches_per_chunk": "chunk_batches",
    }
    flags["mix_chunks"] = "mix_chunks"
    assert {f.name for f in fields(ChunkPlan)} == set(flags)
    for field_name, flag in flags.items():
        assert params[flag].default == getattr(ChunkPlan, field_name), flag


def test_every_architecture_option_reaches_the_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each architecture flag given on the command line ends up in the config the run is built from."""
    from interlayer.sae import cli as sae_cli

    seen = {}

    def stop(architecture, latents, options):
        seen.update(options)
        raise SystemExit(0)

    monkeypatch.setattr(sae_cli, "architecture_config", stop)
    args = ["sae", "train", "--latents", "64", "--out", str(tmp_path), "--k", "3", "--prefixes", "8,64"]
    args += ["--heads", "4", "--m", "2", "--n", "8", "--l0-coefficient", "0.5", "--bandwidth", "0.25"]
    args += ["--initial-threshold", "0.125", "--l1-coefficient", "0.25"]
    with pytest.raises(SystemExit):
        monkeypatch.setattr(sys, "argv", ["interlayer", *args])
        from interlayer.cli import app

        app()
    assert seen == {"k": 3, "prefixes": (8, 64), "heads": 4, "m": 2, "n": 8, "l0_coefficient": 0.5,
                    "bandwidth": 0.25, "initial_threshold": 0.125, "l1_coefficient": 0.25}  # fmt: skip


def test_base_config_fields_are_all_accounted_for() -> None:
    assert {f.name for f in fields(SAEConfig)} - {"latents"} == NOT_FLAGS


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--architecture", "kron", "--k", "4", "--heads", "3", "--m", "2", "--n", "4"],
            "heads·m·n = latents",
        ),
        (["--architecture", "kron", "--k", "4", "--m", "4", "--n", "2"], "m ≤ n"),
        (["--architecture", "matryoshka", "--k", "4", "--prefixes", "16,8,64"], "increasing"),
        (["--architecture", "matryoshka", "--k", "4", "--prefixes", "8,32"], "end at latents (64)"),
        (["--architecture", "matryoshka", "--k", "4", "--prefixes", "8,x"], "comma-separated whole numbers"),
        (
            ["--architecture", "topk", "--k", "4", "--l0-coefficient", "0.1"],
            "--l0-coefficient does not apply",
        ),
        (["--architecture", "jumprelu", "--k", "4"], "--k does not apply to a jumprelu SAE"),
        (["--architecture", "topk"], "--k is required for a topk SAE"),
        (["--architecture", "gated", "--k", "4"], "unknown architecture 'gated'"),
        (
            ["--architecture", "kron", "--k", "4", "--m", "3", "--n", "5"],
            "latents 64 is not a multiple of m·n = 15",
        ),
        (["--architecture", "kron", "--k", "4", "--heads", "4", "--n", "4"], "pass --heads 8"),
        (["--architecture", "matryoshka", "--k", "4", "--prefixes", ""], "--prefixes takes comma-separated"),
        (
            ["--architecture", "topk", "--k", "4", "--m", "2", "--n", "4"],
            "--m, --n do not apply to a topk SAE",
        ),
    ],
)
def test_bad_architecture_settings_are_one_line(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["sae", "train", "--latents", "64", "--out", str(tmp_path / "r"), *args], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "r").exists()


def test_k_eval_above_K_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sae = build_sae(make_config("hierarchical", d_in=32, latents=64, k=8, site="layers.1", model="m"))
    sae.initialise_(torch.Generator().manual_seed(0))
    save_sae(sae, tmp_path / "h")
    code, _, err = run_cli(["sae", "eval", "--sae", str(tmp_path / "h"), "--k-eval", "4,16"], capsys)
    assert code == 2
    assert (
        err.strip() == "error: k = 16 exceeds 8, the largest budget of this hierarchical SAE (its trained K)"
    )
    params = inspect.signature(sae_eval).parameters
    assert "k_eval" in params and json.dumps(params["k_eval"].default) == "null"


def test_eval_reads_the_runs_own_data_by_default(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"Document {i} explains how the cache evicts entry {i}. " * 40)
    run = tmp_path / "run"
    args = [
        "sae",
        "train",
        "--model",
        str(tiny_models["llama"]),
        "--sites",
        "layers.1",
        "--data",
        str(corpus),
    ]
    args += ["--latents", "64", "--k", "4", "--tokens", "512", "--batch-size", "256", "--context-len", "32"]
    code, _, err = run_cli([*args, "--out", str(run)], capsys)
    assert code == 0, err
    for target in (run, run / "layers.1"):  # a run folder, or one SAE folder inside it
        code, out, err = run_cli(["sae", "eval", "--sae", str(target), "--tokens", "200", "--json"], capsys)
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["data"] == str(corpus)
    code, out, _ = run_cli(
        ["sae", "eval", "--sae", str(run), "--tokens", "200", "--data", "stdlib:code", "--json"], capsys
    )
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["data"] == "stdlib:code"
    # --k-eval reports every metric per budget
    code, out, _ = run_cli(
        ["sae", "eval", "--sae", str(run), "--tokens", "200", "--k-eval", "2,4", "--json"], capsys
    )
    by_k = json.loads(out.strip().splitlines()[-1])["by_k"]
    assert code == 0 and sorted(by_k) == ["2", "4"]
    assert by_k["2"]["layers.1"]["l0"] <= 2 < by_k["4"]["layers.1"]["l0"] <= 4
    assert by_k["2"]["layers.1"]["explained_variance"] < by_k["4"]["layers.1"]["explained_variance"]
