"""``lime train``: both architectures start from the same weights and batches, the routers train at their own
learning rate without weight decay (checked on AdamW's known first step), FLOPs are counted as documented,
and a run killed with ``kill -9`` and rerun ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import kill_after_checkpoint
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig

from interlayer.errors import UserError
from interlayer.lime import DenseFormerConfig, LimeConfig
from interlayer.lime.train import LimeTrainConfig, forward_flops_per_token, new_model, train

SMALL = LimeTrainConfig(
    layers=2,
    d_model=32,
    heads=2,
    kv_heads=2,
    intermediate=64,
    context_len=16,
    batch_size=4,
    steps=6,
    warmup_steps=0,
    eval_every=3,
    val_contexts=8,
    checkpoint_every=2,
)


def test_lime_and_llama_start_from_the_same_weights(tiny_mdlm: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_mdlm))
    llama = new_model("llama", SMALL, tokenizer).state_dict()
    lime = new_model("lime", SMALL, tokenizer).state_dict()
    assert set(lime) - set(llama) == {"model.layers.1.self_attn.router.weight"}
    for name, tensor in llama.items():
        assert torch.equal(lime[name], tensor), name
    dynamic = new_model("lime-dynamic", SMALL, tokenizer).state_dict()
    assert all(torch.equal(dynamic[name], tensor) for name, tensor in lime.items())  # the same static routers
    dense = new_model("denseformer", SMALL, tokenizer).state_dict()
    assert set(dense) - set(llama) == {"model.dwa.0.weight", "model.dwa.1.weight"}
    assert all(torch.equal(dense[name], tensor) for name, tensor in llama.items())
    other = new_model("llama", replace(SMALL, seed=1), tokenizer).state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], llama["model.embed_tokens.weight"])


def test_one_adamw_step_moves_routers_by_their_own_rate(
    tiny_mdlm: Path, corpus: Path, tmp_path: Path
) -> None:
    """AdamW's first step moves every weight by lr·sign(g) (m̂/√v̂ = g/|g|) after decaying it by lr·wd·w: the
    routers by 1e-2 with no decay, the base matrices by 1e-3 after a 1e-3·0.1 decay."""
    cfg = replace(SMALL, steps=1, eval_every=1)
    summary = train(tmp_path, cfg, ("lime",), data=str(corpus), tokenizer_name=str(tiny_mdlm), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_mdlm))
    before = new_model("lime", cfg, tokenizer).state_dict()
    after = load_file(str(Path(summary["runs"]["lime"]["model"]) / "model.safetensors"))
    router = "model.layers.1.self_attn.router.weight"
    step = (after[router] - before[router]).abs()
    assert torch.allclose(step, torch.full_like(step, 1e-2), rtol=1e-3)
    query = "model.layers.0.self_attn.q_proj.weight"
    step = (after[query] - before[query] * (1 - 1e-3 * 0.1)).abs()
    assert (step - 1e-3).abs().median() < 1e-6


def test_flops_follow_the_documented_count() -> None:
    llama = LlamaConfig(
        vocab_size=301,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    # matrices 2·(2 layers·(32·32·2 + 32·32·2 + 3·32·64) + 32·301) = 60224; attention 2·4·2·16·17/2 = 2176
    assert forward_flops_per_token(llama, 16) == 62400
    # the router of layer 1 mixes 4 sources into 2 heads of K‖V (32 wide): 2·2·4·32 = 512
    assert forward_flops_per_token(LimeConfig(**llama.to_dict()), 16) == 62912
    # DenseFormer's averages after blocks 0 and 1 weigh 2 and 3 tensors of width 32: 2·32·(2 + 3) = 320
    assert forward_flops_per_token(DenseFormerConfig(**llama.to_dict()), 16) == 62720


def test_runs_record_curves_and_refuse_other_settings(tiny_mdlm: Path, corpus: Path, tmp_path: Path) -> None:
    summary = train(tmp_path, SMALL, ("lime", "llama"), str(corpus), str(tiny_mdlm), progress=False)
    runs = summary["runs"]
    assert runs["lime"]["cross_layer_parameters"] == 2 * 4 and runs["llama"]["cross_layer_parameters"] == 0
    assert runs["lime"]["parameters"] - runs["llama"]["parameters"] == 8
    assert runs["lime"]["train_tokens"] == runs["llama"]["train_tokens"] == 6 * 4 * 16
    history = json.loads((tmp_path / "lime" / "history.json").read_text())
    assert [r["step"] for r in history if "val_loss" in r] == [3, 6]
    assert history[-1]["val_loss"] == runs["lime"]["val_loss"]
    assert history[-1]["val_loss"] < history[2]["val_loss"]  # it learns
    page = (tmp_path / "training.html").read_text()
    assert "Validation loss" in page and page.count("<svg") >= 2
    with pytest.raises(UserError, match="holds a run with config="):
        train(tmp_path, replace(SMALL, d_model=64), ("lime",), str(corpus), str(tiny_mdlm), progress=False)
    with pytest.raises(UserError, match="unknown architecture"):
        train(tmp_path / "x", SMALL, ("gpt",), str(corpus), str(tiny_mdlm), progress=False)


def test_bad_shapes_are_refused_in_one_line() -> None:
    with pytest.raises(UserError, match="kv_heads 3 must divide heads 4"):
        LimeTrainConfig(heads=4, kv_heads=3)
    with pytest.raises(UserError, match="must split into"):
        LimeTrainConfig(d_model=30, heads=4)


def _cli(tiny_mdlm: Path, corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "interlayer",
        "lime",
        "train",
        "--out",
        str(out),
        "--data",
        str(corpus),
        "--tokenizer",
        str(tiny_mdlm),
        "--architectures",
        "lime",
        "--layers",
        "2",
        "--d-model",
        "32",
        "--heads",
        "2",
        "--kv-heads",
        "2",
        "--intermediate",
        "64",
        "--context-len",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "40",
        "--warmup-steps",
        "0",
        "--eval-every",
        "20",
        "--val-contexts",
        "8",
        "--checkpoint-every",
        "2",
        "--json",
    ]


def test_kill_9_then_rerun_gives_the_uninterrupted_model(
    tiny_mdlm: Path, corpus: Path, tmp_path: Path
) -> None:
    """The CLI run is killed after a checkpoint and rerun; the reference trains in this process meanwhile, on
    one thread like the CLI's."""
    assert torch.get_num_threads() == 1
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = _cli(tiny_mdlm, corpus, tmp_path / "cut")
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = replace(SMALL, steps=40, eval_every=20, checkpoint_every=2)
    whole = train(tmp_path / "whole", cfg, ("lime",), str(corpus), str(tiny_mdlm), progress=False)
    state = tmp_path / "cut" / "lime" / "checkpoint" / "state.json"
    killed_at = kill_after_checkpoint(process, state, 4)
    assert 4 <= killed_at < 40 and not (tmp_path / "cut" / "lime" / "model").exists()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["runs"]["lime"]["steps_run_now"] == 40 - killed_at
    a = load_file(str(tmp_path / "whole" / "lime" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "lime" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary["runs"]["lime"]["val_loss"] == whole["runs"]["lime"]["val_loss"]
