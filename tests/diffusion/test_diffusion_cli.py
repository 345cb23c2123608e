"""``interlayer diffusion`` through the real entry point: sampling writes what the library samples, and every
user mistake is one ``error:`` line with exit code 2."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interlayer.diffusion.denoiser import load_denoiser
from interlayer.diffusion.remasker import Remasker, RemaskerConfig, save_remasker
from interlayer.diffusion.samplers import SAMPLERS, SamplerConfig, sample
from interlayer.diffusion.templates import build_templates, decode_samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_cli import assert_user_error, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def remaskers(tiny_mdlm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained remasker for the tiny MDLM (``own``) and one for a copy with one weight changed (``other``)."""
    root = tmp_path_factory.mktemp("remaskers")
    other = root / "other-mdlm"
    shutil.copytree(tiny_mdlm, other)
    weights = load_file(str(other / "model.safetensors"))
    name = sorted(k for k in weights if weights[k].ndim == 2)[0]
    weights[name] = weights[name].clone()
    weights[name][0, 0] += 1e-3
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    folders = {}
    for key, model in (("own", tiny_mdlm), ("other", other)):
        denoiser, _ = load_denoiser(str(model))
        save_remasker(Remasker(denoiser, "head"), denoiser, root / key, RemaskerConfig(), {})
        folders[key] = root / key
    return folders


@pytest.fixture(scope="module")
def causal_lm(tiny_mdlm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama causal LM whose tokenizer names no mask token."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_mdlm))
    tokenizer.mask_token = None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    folder = tmp_path_factory.mktemp("causal") / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(str(folder)).mask_token_id is None
    return folder


def test_sample_writes_the_library_samples(
    tiny_mdlm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["diffusion", "sample", "--denoiser", str(tiny_mdlm), "--sampler", "mdlm", "--steps", "4",
            "--num-samples", "3", "--out", str(tmp_path / "s"), "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(1 <= line["nfe"] <= 4 and line["remasker_nfe"] == 0 for line in lines)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["samples"] == 3 and summary["steps"] == 4 and summary["sampler"].startswith("mdlm")
    assert summary["nfe"] == pytest.approx(sum(line["nfe"] for line in lines) / 3)
    # the reference: the library's sampler on the same templates, seed and settings
    denoiser, tokenizer = load_denoiser(str(tiny_mdlm))
    template, attention = build_templates(tokenizer, denoiser.mask_id, 3, 32)
    result = sample(denoiser, SamplerConfig(sampler="mdlm", steps=4), template, attention, seed=0)
    texts, ids = decode_samples(tokenizer, result.tokens_NL, result.attention_NL)
    assert [line["ids"] for line in lines] == ids and [line["text"] for line in lines] == texts
    assert [line["nfe"] for line in lines] == result.nfe_N.tolist()
    assert not (result.tokens_NL == denoiser.mask_id).any() and max(len(i) for i in ids) > 20


def test_gstar_with_its_remasker_counts_remasker_calls(
    tiny_mdlm: Path, remaskers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["diffusion", "sample", "--denoiser", str(tiny_mdlm), "--sampler", "gstar", "--schedule", "star",
            "--steps", "3", "--num-samples", "2", "--remasker", str(remaskers["own"]), "--out",
            str(tmp_path / "g"), "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
    # every step of the all-star schedule scores one proposal per sample
    assert [line["remasker_nfe"] for line in lines] == [3, 3]
    assert json.loads(out.strip().splitlines()[-1])["remasker_nfe"] == 3.0


def test_eval_runs_every_sampler_at_every_step_count(
    tiny_mdlm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["diffusion", "eval", "--denoiser", str(tiny_mdlm), "--samplers", "mdlm, star", "--steps", "2,3",
            "--num-samples", "2", "--scorer", "", "--out", str(tmp_path), "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "results.json").read_text())
    rows = summary["rows"]
    assert [(r["sampler"].split("(")[0].split()[0], r["steps"]) for r in rows] == [
        ("mdlm", 2), ("mdlm", 3), ("star", 2), ("star", 3)
    ]  # fmt: skip
    denoiser, tokenizer = load_denoiser(str(tiny_mdlm))
    template, attention = build_templates(tokenizer, denoiser.mask_id, 2, 32)
    for row in rows:
        name = "mdlm" if row["sampler"].startswith("mdlm") else "star"
        result = sample(denoiser, SamplerConfig(sampler=name, steps=row["steps"]), template, attention)
        assert row["nfe"] == float(result.nfe_N.float().mean()) and row["nfe"] <= row["steps"]
        assert row["remasker_nfe"] == 0.0 and 0 <= row["python_validity"] <= 1


def test_samplers_lists_every_registered_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["diffusion", "samplers"], capsys)
    assert code == 0, err
    first_words = {line.split()[1] for line in out.splitlines() if line.startswith("│")}
    assert set(SAMPLERS) <= first_words and len(SAMPLERS) == 9


def test_a_prompt_longer_than_the_tokenizer_maximum_is_one_error_line(
    tiny_mdlm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The tokenizer's "longer than the specified maximum sequence length" warning (a log record, which the
    command line prints to stderr) must not join the error line."""
    prompt = (
        "def wrap(text, width=70, **kwargs):\n    return TextWrapper(width=width, **kwargs).wrap(text)\n" * 4
    )
    args = ["diffusion", "sample", "--denoiser", str(tiny_mdlm), "--steps", "2", "--num-samples", "1",
            "--prompt", prompt, "--length", "8", "--out", str(tmp_path / "x")]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        line = assert_user_error(run_cli(args, capsys), "tokens with BOS", "leaving no room", "sequence of 8")
    assert int(line.split(" is ")[1].split()[0]) > 32
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_user_errors(
    tiny_mdlm: Path,
    causal_lm: Path,
    remaskers: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def sample_args(*extra: str) -> list[str]:
        return ["diffusion", "sample", "--denoiser", str(tiny_mdlm), "--steps", "2", "--num-samples", "1",
                "--out", str(tmp_path / "x"), *extra]  # fmt: skip

    def refused(args: list[str], *needles: str) -> str:
        return assert_user_error(run_cli(args, capsys), *needles)

    refused(["diffusion", "sample", "--denoiser", str(causal_lm), "--out", str(tmp_path / "x")],
            "is a causal lm, not a masked LM", "cannot denoise")  # fmt: skip
    refused(["diffusion", "sample", "--denoiser", str(causal_lm), "--adapter", "dream", "--out",
             str(tmp_path / "x")], "has no mask token", "cannot denoise")  # fmt: skip
    refused(sample_args("--steps", "0"), "--steps", "at least 1, got 0")
    refused(sample_args("--t-on", "0"), "--t-on", "(0, 1], got 0.0")
    refused(sample_args("--t-on", "1.5"), "--t-on", "(0, 1], got 1.5")
    refused(sample_args("--sampler", "gstar"), "gstar needs a remasker", "--remasker")
    refused(sample_args("--sampler", "gstar", "--remasker", str(remaskers["other"])),
            "was trained for denoiser", "other-mdlm", "train-remasker")  # fmt: skip
    refused(sample_args("--sampler", "gstar", "--remasker", str(tmp_path / "none")), "remasker.json")
    prompt = "def wrap(text, width=70, **kwargs):\n    return TextWrapper(width=width, **kwargs).wrap(text)\n"
    refused(sample_args("--prompt", prompt, "--length", "8"), "leaving no room", "sequence of 8")
    refused(sample_args("--sampler", "nope"), "sampler must be one of", "mdlm", "gstar", "'nope'")
    refused(sample_args("--length", "33"), "--length 33 exceeds the denoiser's 32 positions")
    refused(["diffusion", "train-remasker", "--denoiser", str(tiny_mdlm), "--out", str(tmp_path / "r"),
             "--init", "some"], "init must be one of all, first, head")  # fmt: skip
    evaluate = ["diffusion", "eval", "--denoiser", str(tiny_mdlm), "--scorer", ""]
    refused([*evaluate, "--samplers", " , "], "--samplers takes comma-separated sampler names")
    refused([*evaluate, "--steps", "4,x"], "--steps takes comma-separated whole numbers")
    refused([*evaluate, "--steps", "0,4"], "--steps", "at least 1, got 0")
    refused([*evaluate, "--samplers", "mdlm,nope"], "sampler must be one of", "'nope'")
    refused([*evaluate, "--samplers", "mdlm,gstar"], "gstar needs a remasker")  # before any sampling
    refused(
        [*evaluate, "--samplers", "mdlm", "--scorer", str(tiny_mdlm)],
        "--scorer",
        "is a masked lm; it must be a causal LM",
    )
    if importlib.util.find_spec("mauve") is None:
        refused(
            [*evaluate, "--samplers", "mdlm", "--mauve-features", "gpt2"],
            "needs the optional package mauve-text",
        )
    assert not (tmp_path / "x").exists()
