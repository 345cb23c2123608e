"""``diffusion train`` and ``train-remasker``: resumed runs end bit-identical to uninterrupted ones (in-process
interruption, growing --steps, and a real kill -9 through the CLI), the MDLM validation NELBO falls, and a
folder holding a run with other settings is refused."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import kill_after_checkpoint
from safetensors.torch import load_file

from interlayer.data import packed_contexts
from interlayer.diffusion import train as train_module
from interlayer.diffusion.denoiser import Denoiser, load_denoiser
from interlayer.diffusion.remasker import RemaskerConfig
from interlayer.diffusion.schedule import mdlm_loss
from interlayer.diffusion.train import DenoiserTrainConfig, train_denoiser, train_remasker
from interlayer.errors import UserError


@pytest.fixture(scope="module")
def denoiser_and_tokenizer(tiny_mdlm: Path) -> tuple[Denoiser, Any]:
    return load_denoiser(str(tiny_mdlm))


SMALL = DenoiserTrainConfig(
    d_model=32,
    layers=1,
    heads=2,
    intermediate=64,
    context_len=16,
    steps=8,
    batch_size=4,
    lr=3e-3,
    warmup_steps=3,
    checkpoint_every=3,
    val_contexts=8,
)


def _weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_denoiser_resumes_bit_identical_after_an_interruption(
    tiny_mdlm: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = train_denoiser(
        tmp_path / "whole", str(corpus), SMALL, tokenizer_name=str(tiny_mdlm), progress=False
    )
    assert whole["steps_run_now"] == 8

    calls = []

    def dies_in_step_5(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed in step 5")
        return mdlm_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "mdlm_loss", dies_in_step_5)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_denoiser(cut, str(corpus), SMALL, tokenizer_name=str(tiny_mdlm), progress=False)
    monkeypatch.undo()
    # step 4 ran but was not checkpointed; nothing of the result was written
    assert json.loads((cut / "checkpoint" / "state.json").read_text())["step"] == 3
    assert not (cut / "model").exists() and not (cut / "summary.json").exists()
    resumed = train_denoiser(cut, str(corpus), SMALL, tokenizer_name=str(tiny_mdlm), progress=False)
    assert resumed["steps_run_now"] == 5

    a = _weights(tmp_path / "whole" / "model", "model.safetensors")
    b = _weights(cut / "model", "model.safetensors")
    _assert_same(a, b)
    history = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert history == json.loads((cut / "history.json").read_text())
    assert [r["step"] for r in history] == list(range(1, 9))
    # training moved the weights: the same seed's initial model differs from the result
    initial = train_module._new_masked_lm(load_denoiser(str(tiny_mdlm))[1], SMALL).state_dict()
    moved = [k for k in a if not torch.equal(a[k], initial[k])]
    assert len(moved) >= len(a) - 2

    # the denoiser's run may not change any setting, not even --steps
    for changed in (replace(SMALL, steps=9), replace(SMALL, lr=1e-3)):
        with pytest.raises(UserError, match="holds a run with config="):
            train_denoiser(cut, str(corpus), changed, tokenizer_name=str(tiny_mdlm), progress=False)
    with pytest.raises(UserError, match="holds a run with data="):
        train_denoiser(cut, str(tmp_path), SMALL, tokenizer_name=str(tiny_mdlm), progress=False)


def test_mdlm_validation_nelbo_falls(tiny_mdlm: Path, corpus: Path, tmp_path: Path) -> None:
    cfg = replace(SMALL, steps=40, batch_size=8, checkpoint_every=40, eval_every=10, val_contexts=16)
    summary = train_denoiser(
        tmp_path / "run", str(corpus), cfg, tokenizer_name=str(tiny_mdlm), progress=False
    )
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    nelbo = {r["step"]: r["val_nelbo"] for r in history if "val_nelbo" in r}
    assert sorted(nelbo) == [10, 20, 30, 40] and summary["val_nelbo"] == nelbo[40]
    # at initialisation the NELBO is about ln 300 (uniform over the vocabulary without [MASK])
    assert nelbo[10] > nelbo[20] > nelbo[40] and nelbo[10] - nelbo[40] > 0.5
    assert nelbo[40] < math.log(300) - 1.0

    # the saved model is the trained one: its NELBO on the same validation draws is the logged number
    denoiser, tokenizer = load_denoiser(summary["model"])
    assert denoiser.mask_id == 300 and denoiser.network.config.max_position_embeddings == 16
    val_NL = packed_contexts(tokenizer, str(corpus), "validation", 16, 16)
    maskable_NL = torch.ones_like(val_NL, dtype=torch.bool)
    maskable_NL[:, 0] = False
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        total = mdlm_loss(
            lambda x: denoiser.network(input_ids=x).logits,
            val_NL,
            300,
            maskable_NL,
            generator,
            reduction="sum",
        )
    assert float(total) / (len(val_NL) * 15) == pytest.approx(nelbo[40], rel=1e-5)


REMASKER = RemaskerConfig(
    init="all",
    steps=4,
    batch_size=4,
    lr=1e-2,
    warmup_steps=2,
    checkpoint_every=2,
    eval_every=0,
    val_contexts=8,
)


def test_remasker_resumes_bit_identical_when_steps_grow(
    denoiser_and_tokenizer: tuple[Denoiser, Any], corpus: Path, tmp_path: Path
) -> None:
    denoiser, tokenizer = denoiser_and_tokenizer
    longer = replace(REMASKER, steps=8)
    whole = train_remasker(denoiser, tokenizer, tmp_path / "whole", str(corpus), longer, progress=False)
    assert whole["steps_run_now"] == 8 and whole["trainable_parameters"] > 1000
    first = train_remasker(denoiser, tokenizer, tmp_path / "grown", str(corpus), REMASKER, progress=False)
    assert first["steps_run_now"] == 4
    grown = train_remasker(denoiser, tokenizer, tmp_path / "grown", str(corpus), longer, progress=False)
    assert grown["steps_run_now"] == 4 and grown["steps"] == 8
    a = _weights(tmp_path / "whole", "remasker.safetensors")
    b = _weights(tmp_path / "grown", "remasker.safetensors")
    _assert_same(a, b)
    assert a["head.weight"].abs().sum() > 0  # the zero-initialised head moved
    for key in ("precision", "recall", "f1", "error_rate", "loss"):
        assert grown[f"val_{key}"] == whole[f"val_{key}"]
    assert 0 < whole["val_error_rate"] < 1
    meta = json.loads((tmp_path / "grown" / "remasker.json").read_text())
    assert meta["denoiser_fingerprint"] == denoiser.fingerprint() and meta["context_len"] == 32

    # other settings are refused; so is a shorter run than the folder already holds
    with pytest.raises(UserError, match="holds a run with config="):
        train_remasker(
            denoiser,
            tokenizer,
            tmp_path / "grown",
            str(corpus),
            replace(longer, loss="ranking"),
            progress=False,
        )
    with pytest.raises(UserError, match="step 8"):
        train_remasker(denoiser, tokenizer, tmp_path / "grown", str(corpus), REMASKER, progress=False)
    _assert_same(a, _weights(tmp_path / "grown", "remasker.safetensors"))


def test_a_failed_first_attempt_does_not_lock_the_folder(
    denoiser_and_tokenizer: tuple[Denoiser, Any], corpus: Path, tmp_path: Path
) -> None:
    """A user error before the first checkpoint leaves no run behind: the corrected command runs."""
    denoiser, tokenizer = denoiser_and_tokenizer
    with pytest.raises(UserError, match="fewer than --batch-size 100000"):
        train_remasker(
            denoiser, tokenizer, tmp_path, str(corpus), replace(REMASKER, batch_size=100000), progress=False
        )
    summary = train_remasker(
        denoiser, tokenizer, tmp_path, str(corpus), replace(REMASKER, steps=1), progress=False
    )
    assert summary["steps_run_now"] == 1


def _cli(tiny_mdlm: Path, corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "interlayer", "diffusion", "train-remasker", "--denoiser", str(tiny_mdlm),
        "--data", str(corpus), "--out", str(out), "--steps", "40", "--batch-size", "4", "--lr", "1e-3",
        "--checkpoint-every", "2", "--eval-every", "0", "--json",
    ]  # fmt: skip


def test_kill_9_then_rerun_gives_the_uninterrupted_remasker(
    denoiser_and_tokenizer: tuple[Denoiser, Any], tiny_mdlm: Path, corpus: Path, tmp_path: Path
) -> None:
    """The CLI run is killed after a checkpoint and rerun; the uninterrupted reference is trained in this
    process meanwhile, on one thread like the CLI's (the session fixture's torch.set_num_threads(1))."""
    assert torch.get_num_threads() == 1
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = _cli(tiny_mdlm, corpus, tmp_path / "cut")
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    denoiser, tokenizer = denoiser_and_tokenizer
    cfg = RemaskerConfig(steps=40, batch_size=4, lr=1e-3, checkpoint_every=2, eval_every=0)
    whole = train_remasker(denoiser, tokenizer, tmp_path / "whole", str(corpus), cfg, progress=False)
    state = tmp_path / "cut" / "checkpoint" / "state.json"
    killed_at = kill_after_checkpoint(process, state, 4)
    assert 4 <= killed_at < 40 and not (tmp_path / "cut" / "remasker.safetensors").exists()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["steps_run_now"] == 40 - killed_at and whole["steps_run_now"] == 40
    a = _weights(tmp_path / "whole", "remasker.safetensors")
    _assert_same(a, _weights(tmp_path / "cut", "remasker.safetensors"))
    assert a["head.weight"].abs().sum() > 0
    assert summary["val_f1"] == whole["val_f1"] and summary["loss"] == whole["loss"]


def test_continue_from_a_masked_lm_whose_mask_id_is_in_its_config_only(
    tiny_mdlm: Path, corpus: Path, tmp_path: Path
) -> None:
    import shutil

    from transformers import AutoTokenizer

    init = tmp_path / "init"
    shutil.copytree(tiny_mdlm, init)
    tokenizer = AutoTokenizer.from_pretrained(str(init))
    tokenizer.mask_token = None
    tokenizer.save_pretrained(init)
    assert AutoTokenizer.from_pretrained(str(init)).mask_token_id is None
    assert json.loads((init / "config.json").read_text())["mask_token_id"] == 300
    cfg = replace(SMALL, context_len=32, steps=3, checkpoint_every=3)
    summary = train_denoiser(tmp_path / "run", str(corpus), cfg, init=str(init), progress=False)
    assert summary["steps_run_now"] == 3 and 0 < summary["val_nelbo"] < math.log(300)
    denoiser, _ = load_denoiser(summary["model"])
    assert denoiser.mask_id == 300
    before = load_file(str(init / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert before.keys() == after.keys() and not torch.equal(
        before[sorted(before)[0]], after[sorted(after)[0]]
    )
