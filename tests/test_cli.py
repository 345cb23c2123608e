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
    from interlayer.sae import TopKConfig, TopKSAE, save_sae

    sae = TopKSAE(TopKConfig(d_in=16, latents=32, k=4, site="layers.1", model=str(tiny_models["llama"])))
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
    expected = recompute_eval(tiny_models["llama"], out / "layers.1", corpus, tokens=300, context_len=32)
    assert metrics["tokens"] == expected["tokens"]
    for key in ("explained_variance", "l0", "ce_clean", "ce_sae", "delta_ce"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key
    assert metrics["l0"] == pytest.approx(8.0)


def recompute_eval(
    model: Path, sae_folder: Path, data: Path, tokens: int, context_len: int
) -> dict[str, float]:
    """The eval metrics computed here from their definitions: the same validation batches (16 contexts each,
    until ``tokens`` kept tokens), activations captured by a plain hook, the SAE applied to the kept tokens,
    and cross-entropies from plain forward passes with and without the SAE spliced in."""
    import torch.nn.functional as F

    from interlayer.data import iter_documents, token_batches
    from interlayer.models import load_model
    from interlayer.sae import load_sae
    from interlayer.sites import capture, resolve_sites, splice

    lm, sae = load_model(str(model)), load_sae(sae_folder)
    (site,) = resolve_sites(lm.model, "layers.1")
    xs, x_hats, l0s, nll, count = [], [], [], {"clean": 0.0, "sae": 0.0}, 0
    seen = 0
    with torch.no_grad():
        for batch in token_batches(
            lm.tokenizer, iter_documents(str(data), split="validation"), context_len, 16
        ):
            ids_BT, keep_BT = batch.input_ids_BT, batch.keep_BT
            with capture(lm.model, [site]) as acts:
                clean_BTV = lm.model(input_ids=ids_BT, attention_mask=batch.attention_mask_BT).logits
            with splice(lm.model, {site: sae}, keep=keep_BT):
                sae_BTV = lm.model(input_ids=ids_BT, attention_mask=batch.attention_mask_BT).logits
            x_ND = acts["layers.1"][keep_BT].double()
            xs.append(x_ND)
            x_hats.append(sae(x_ND.float()).double())
            l0s.append((sae.encode(x_ND.float()) != 0).sum(1).double())
            target_BT = keep_BT[:, 1:]
            for name, logits_BTV in (("clean", clean_BTV), ("sae", sae_BTV)):
                nll[name] += float(
                    F.cross_entropy(
                        logits_BTV[:, :-1][target_BT].double(), ids_BT[:, 1:][target_BT], reduction="sum"
                    )
                )
            count += int(target_BT.sum())
            seen += int(keep_BT.sum())
            if seen >= tokens:
                break
    x, x_hat = torch.cat(xs), torch.cat(x_hats)
    ev = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    ce_clean, ce_sae = nll["clean"] / count, nll["sae"] / count
    return {
        "tokens": len(x),
        "explained_variance": ev,
        "l0": float(torch.cat(l0s).mean()),
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "delta_ce": ce_sae - ce_clean,
    }


def test_sites_table_is_on_stdout_and_json_replaces_it(tiny_models, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli(["sites", "--model", str(tiny_models["llama"])], capsys)
    assert code == 0, err
    rows = {
        c[0]: c[1:] for line in out.splitlines() if len(c := [x.strip() for x in line.split("│")[1:-1]]) == 3
    }
    names = ["embed"] + [f"layers.{i}{part}" for i in range(3) for part in (".attn", ".mlp", "")]
    assert list(rows) == names  # the whole table, in forward order, on stdout (`| grep` sees it)
    assert rows["layers.2.mlp"] == ["model.layers.2.mlp", "32"]
    assert rows["embed"] == ["model.layers.0", "32"]
    assert "layers.2.mlp" not in err
    code, out, err = run_cli(["sites", "--model", str(tiny_models["llama"]), "--json"], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 1  # no table with --json: the JSON line is all of stdout
    summary = json.loads(lines[0])
    assert [row["site"] for row in summary["sites"]] == names and summary["sites"][-1]["width"] == 32


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
    from interlayer.sae import TopKConfig, TopKSAE, save_sae

    for name in ("a", "b"):
        sae = TopKSAE(TopKConfig(d_in=32, latents=16, k=2, site="layers.1", model=str(tiny_models["llama"])))
        sae.initialise_(torch.Generator().manual_seed(0))
        save_sae(sae, tmp_path / "runs" / name)
    args = ["sae", "eval", "--sae", str(tmp_path / "runs"), "--data", str(corpus), "--tokens", "50"]
    assert_user_error(run_cli(args, capsys), "two SAEs for site layers.1")


def test_out_is_a_file(tiny_models, corpus, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    line = assert_user_error(run_cli(train_args(tiny_models["llama"], corpus, tmp_path / "taken"), capsys))
    assert "taken" in line
