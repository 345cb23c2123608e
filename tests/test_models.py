"""Tests for interlayer.models: loading tiny local folders, the packaged MiniLM, and user errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from conftest import DECODERS

from interlayer.errors import UserError
from interlayer.models import DTYPES, load_model, minilm_path, resolve_model_source

MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "bert": "BertModel",
    "gemma3": "Gemma3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "falcon": "FalconForCausalLM",
    "bloom": "BloomForCausalLM",
    "opt": "OPTForCausalLM",
    "gptj": "GPTJForCausalLM",
}


@pytest.mark.parametrize("family", [*DECODERS, "bert"])
def test_load_tiny_folder(tiny_models: dict[str, Path], family: str) -> None:
    lm = load_model(str(tiny_models[family]))
    assert lm.name == str(tiny_models[family])
    assert lm.is_causal_lm is (family != "bert")
    assert type(lm.model).__name__ == MODEL_CLASSES[family]
    assert lm.d_model == 32
    assert lm.model.config.num_hidden_layers == 3
    assert lm.device == torch.device("cpu")
    assert lm.model.training is False
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    # The folder's tokenizer is the MiniLM WordPiece one the fixture saved.
    assert lm.tokenizer.cls_token_id == 101 and lm.tokenizer.sep_token_id == 102
    assert lm.tokenizer.vocab_size == lm.model.config.vocab_size == 30522


def test_load_bfloat16(tiny_models: dict[str, Path]) -> None:
    lm = load_model(str(tiny_models["llama"]), dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_load_minilm_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_source("minilm") == (str(minilm_path()), True)
    assert (minilm_path() / "config.json").is_file()
    lm = load_model("minilm")
    assert lm.name == "minilm"
    assert lm.is_causal_lm is False
    assert type(lm.model).__name__ == "BertModel"
    assert lm.model.config.num_hidden_layers == 6
    assert lm.d_model == 384
    # Real (not random) weights: the embedding of the same token is the same on every load.
    encoded = lm.tokenizer("The cat sat on the mat.", return_tensors="pt")
    assert encoded["input_ids"][0, 0].item() == 101 and encoded["input_ids"][0, -1].item() == 102
    with torch.no_grad():
        hidden = lm.model(**encoded).last_hidden_state
    assert hidden.shape == (1, encoded["input_ids"].shape[1], 384)
    assert bool(torch.isfinite(hidden).all())


def _forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to read a config or tokenizer fail the test: errors must come before loading."""

    def boom(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("load_model tried to load instead of failing fast")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)


def test_missing_folder_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_loading(monkeypatch)
    with pytest.raises(UserError, match=r"not found or has no config\.json: \./does-not-exist"):
        load_model("./does-not-exist")


def test_folder_without_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    _forbid_loading(monkeypatch)
    with pytest.raises(UserError, match="has no config.json") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_unknown_dtype(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_loading(monkeypatch)
    with pytest.raises(UserError, match="unknown dtype 'float64'") as info:
        load_model(str(tiny_models["llama"]), dtype="float64")
    for name in DTYPES:
        assert name in str(info.value)


def test_unknown_zoo_model(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_loading(monkeypatch)
    with pytest.raises(UserError, match="unknown zoo model 'tiny'"):
        load_model("zoo:tiny")


def test_cuda_requested_without_cuda(tiny_models: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="--device cpu"):
        load_model(str(tiny_models["gpt2"]), device="cuda")
