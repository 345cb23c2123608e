"""Denoisers: SUBS, head kinds learned by load_model, adapters for masked LMs and LLaDA/Dream-style code."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as T

from interlayer.diffusion.denoiser import Denoiser, adapter_for, load_denoiser, subs_log_probs
from interlayer.errors import UserError
from interlayer.models import head_kind, load_model, minilm_path
from interlayer.sites import model_sites


def test_subs_copies_revealed_tokens_and_never_predicts_mask() -> None:
    logits = torch.tensor([[[1.0, 2.0, 3.0, 9.0], [0.0, 0.0, 0.0, 0.0]]])
    x_t = torch.tensor([[3, 1]])  # position 0 masked (id 3), position 1 revealed as token 1
    log_p = subs_log_probs(logits, x_t, mask_id=3)
    expected = torch.tensor([1.0, 2.0, 3.0]).log_softmax(-1)
    assert torch.allclose(log_p[0, 0, :3], expected) and log_p[0, 0, 3] == -math.inf
    assert log_p[0, 1].tolist() == [-math.inf, 0.0, -math.inf, -math.inf]


class _Echo(torch.nn.Module):
    """Logits whose argmax at position ℓ is ℓ (so a shift is visible)."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(1, 8, bias=False)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(positions, 8).float() * 10)


def test_dream_adapter_shifts_logits_right_by_one() -> None:
    x = torch.full((1, 5), 7)
    plain = Denoiser(_Echo(), 7, "masked_lm").logits(x).argmax(-1)
    dream = Denoiser(_Echo(), 7, "dream").logits(x).argmax(-1)
    assert plain.tolist() == [[0, 1, 2, 3, 4]] and dream.tolist() == [[0, 0, 1, 2, 3]]


def _save(model: torch.nn.Module, folder: Path, tokenizer: object) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


@pytest.fixture(scope="module")
def masked_lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tokenizer = T.AutoTokenizer.from_pretrained(str(minilm_path()))
    root = tmp_path_factory.mktemp("masked")
    torch.manual_seed(0)
    bert = T.BertForMaskedLM(
        T.BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    modern = T.ModernBertForMaskedLM(
        T.ModernBertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
            cls_token_id=101,
            sep_token_id=102,
        )
    )
    llama = T.LlamaForCausalLM(
        T.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    return {
        "bert": _save(bert, root / "bert", tokenizer),
        "modernbert": _save(modern, root / "modernbert", tokenizer),
        "llama": _save(llama, root / "llama", tokenizer),
    }


def test_load_model_learns_the_head_kind(masked_lms: dict[str, Path]) -> None:
    assert load_model(str(masked_lms["bert"])).head == "masked_lm"
    assert load_model(str(masked_lms["modernbert"])).head == "masked_lm"
    llama = load_model(str(masked_lms["llama"]))
    assert llama.head == "causal_lm" and llama.is_causal_lm
    assert load_model("minilm").head == "encoder"
    assert head_kind(T.BertConfig()) == "encoder"  # a config built in code names no architecture


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_masked_lms_denoise_and_expose_sites(masked_lms: dict[str, Path], family: str) -> None:
    denoiser, tokenizer = load_denoiser(str(masked_lms[family]))
    assert denoiser.mask_id == tokenizer.mask_token_id == 103 and denoiser.adapter == "masked_lm"
    x = torch.tensor([[101, 2023, 103, 2003, 102]])
    log_p = denoiser(x)
    raw = denoiser.network(input_ids=x).logits
    assert torch.allclose(log_p[0, 2, :103], subs_log_probs(raw, x, 103)[0, 2, :103])
    assert log_p[0, 1, 2023] == 0.0 and math.isclose(float(log_p[0, 2].exp().sum()), 1.0, rel_tol=1e-5)
    assert {"layers.0", "layers.1", "layers.1.mlp", "layers.1.attn"} <= set(model_sites(denoiser.network))


def test_a_causal_lm_is_refused(masked_lms: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="not a masked LM: it cannot denoise"):
        load_denoiser(str(masked_lms["llama"]))


_CONFIG_CODE = """
from transformers import PretrainedConfig

class TinyDiffConfig(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, vocab_size=40, hidden_size=16, mask_token_id=39, **kwargs):
        self.vocab_size, self.hidden_size, self.mask_token_id = vocab_size, hidden_size, mask_token_id
        super().__init__(**kwargs)
"""

_MODEL_CODE = '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from .configuration_tinydiff import TinyDiffConfig

class TinyDiffModel(PreTrainedModel):
    """A bidirectional stand-in with LLaDA's interface: model(input_ids).logits, one row per position."""

    config_class = TinyDiffConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.mix = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.embed(input_ids)
        h = h + self.mix(h.mean(1, keepdim=True))  # every position sees every other
        return MaskedLMOutput(logits=self.lm_head(h))
'''


@pytest.mark.parametrize("model_type,adapter", [("llada", "llada"), ("dream", "dream")])
def test_remote_code_checkpoints_load_with_trust_remote_code(
    tmp_path: Path, model_type: str, adapter: str
) -> None:
    """LLaDA/Dream ship their own modelling code: the loading path through AutoModel + trust_remote_code,
    exercised with a tiny stand-in of the same interface (their real code cannot be downloaded here)."""
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "configuration_tinydiff.py").write_text(_CONFIG_CODE.format(model_type=model_type))
    (folder / "modeling_tinydiff.py").write_text(_MODEL_CODE)
    config = {
        "model_type": model_type,
        "architectures": ["TinyDiffModel"],
        "auto_map": {
            "AutoConfig": "configuration_tinydiff.TinyDiffConfig",
            "AutoModel": "modeling_tinydiff.TinyDiffModel",
        },
        "vocab_size": 30522,
        "hidden_size": 16,
        "mask_token_id": 30521,
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = T.AutoTokenizer.from_pretrained(str(minilm_path()))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    loaded_config = T.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    T.AutoModel.from_config(loaded_config, trust_remote_code=True).save_pretrained(folder)
    with pytest.raises(UserError, match="could not be loaded"):
        load_denoiser(str(folder))
    denoiser, _ = load_denoiser(str(folder), trust_remote_code=True)
    assert denoiser.adapter == adapter == adapter_for(denoiser.network.config)
    assert denoiser.mask_id == 103  # the tokenizer's [MASK] wins over the config's
    x = torch.tensor([[1, 103, 5, 103]])
    raw = denoiser.network(input_ids=x).logits
    expected = raw if adapter == "llada" else torch.cat([raw[:, :1], raw[:, :-1]], 1)
    assert torch.allclose(denoiser.logits(x), expected)
