"""The zoo: tiny reference models trained here, on the embedded corpora, and cached.

Nothing can be downloaded where interlayer runs, yet several capabilities need a causal LM that really
learned something (or, for speech, an encoder pretrained on speech). Each zoo model is built from a
:class:`ZooSpec` in :data:`REGISTRY`; the language models (kinds ``causal_lm`` and ``mdlm``) so:

1. A byte-level BPE tokenizer is trained with the ``tokenizers`` library on the *train* split of
   ``stdlib:code`` and ``stdlib:docs`` (pre-tokenisation: every digit alone, then GPT-2's byte-level split;
   special tokens ``<s>`` (BOS, prepended by the tokenizer) and ``</s>`` (EOS, between documents)).
2. The spec's corpus is packed into contexts of ``context_len`` tokens (``[BOS] + body``, documents joined by
   EOS; :func:`interlayer.data.pack_contexts`). ``stdlib:*`` corpora are split by *file* (the hash rule of
   :mod:`interlayer.data`), the arithmetic corpus by *question* (:mod:`interlayer.arithmetic`), so no
   validation text is ever trained on.
3. A ``transformers.LlamaForCausalLM`` (tied embeddings) is trained from ``torch.manual_seed(seed)`` with
   AdamW (β = (0.9, 0.95), weight decay on matrices only, gradient norm clipped at 1) on
   L = mean over positions t ≥ 1 of −log p(x_t | x_<t); a spec of kind ``mdlm`` instead trains a
   bidirectional ``transformers.ModernBertForMaskedLM`` (the same tokenizer plus a ``[MASK]`` token appended
   at id ``vocab_size``) on the MDLM objective of :mod:`interlayer.diffusion.schedule` (the one place the
   core reaches up into a capability: the zoo builds that capability's reference model), its masks and
   times drawn from a generator seeded with ``seed``. Both with a learning rate rising linearly over
   ``warmup_steps`` then following a cosine from ``lr`` to ``lr / 10`` at ``steps``. Batches are drawn
   without replacement from a seeded permutation of the training contexts, renewed each epoch.
   Deterministic algorithms are switched on for the build, so the same spec gives the same weights on the
   same machine (same thread count).
4. It is evaluated on the validation contexts (at most ``val_contexts`` of them, evenly spaced): validation
   loss (nats per predicted token) and perplexity exp(loss), next to two baselines fitted on all training
   contexts and scored on the very same targets (:func:`ngram_baselines`). For ``mdlm`` the validation loss
   is the MDLM negative ELBO per token (one draw of times and masks per context, from ``seed``): an upper
   bound on the negative log-likelihood, so exp of it bounds the perplexity from above. ``arith-lm`` also stops early
   once its greedy accuracy on ``probe_problems`` validation problems reaches ``stop_accuracy`` (checked every
   ``probe_every`` steps), and is then scored on ``test_problems`` test problems with a Wilson 95% interval.
5. It is saved with ``save_pretrained`` (model and tokenizer, the standard transformers layout) in a
   temporary folder inside the zoo folder, ``manifest.json`` (spec, corpus fingerprints, versions, seed,
   metrics, build time, and the sha256 of every file) is written last, and the folder is renamed into place.

A spec of kind ``wav2vec2`` (corpus ``synth:speech``) is a speech encoder, pretrained as wav2vec 2.0
(arXiv 2006.11477) in the manner of transformers' ``run_wav2vec2_pretraining_no_trainer.py`` example:

1. Its clips are the first ``digits_clips`` clips of the *train* split of ``synth:digits`` and the first
   ``styles_clips`` of ``synth:styles`` (:func:`interlayer.speech.corpus.embedded_set`, seed 0); the last
   ``heldout_clips`` of each set are held out for the loss figures, the rest are trained on. The validation and
   test splits, on which the speech capabilities evaluate, are never read.
2. Each batch of ``batch_size`` clips (of similar lengths, :func:`_length_batches`) goes through the saved
   ``Wav2Vec2FeatureExtractor``: every clip normalised to zero mean and unit variance, (x − mean) / √(var + 10⁻⁷),
   zero-padded to the batch's longest, with an attention mask. The seven-layer convolutional feature encoder
   (kernels 10, 3, 3, 3, 3, 2, 2; strides 5, 2, 2, 2, 2, 2, 2) gives one frame per 320 samples (50 frames/s).
3. Masks and negatives come from transformers' own samplers, run on a numpy generator seeded with ``seed``:
   ``_compute_mask_indices`` starts ⌊mask_prob · frames / mask_length + u⌋ spans (u ~ U[0, 1) per batch, at
   least 2) of ``mask_length`` frames within each clip's frames, and ``_sample_negative_indices`` draws
   ``negatives`` distractors per masked frame among the other masked frames of the same clip.
4. ``transformers.Wav2Vec2ForPreTraining`` gives L = L_m + 0.1 · L_d summed over the masked frames (L_m: the
   contrastive cross-entropy of each masked frame's context vector against its quantised target and the
   distractors, cosine similarity / 0.1; L_d: the codebook diversity penalty (GV − perplexity) / GV), and
   the step minimises L / (number of masked frames), with the LMs' AdamW, learning-rate schedule and
   gradient clipping (norm 1). The Gumbel-softmax temperature is max(2 · d^step, 0.5) with d chosen so that it
   reaches 0.5 at 70% of ``steps`` (fairseq's 2 → 0.5 at about 70% of its 400k updates).
5. The contrastive loss per masked frame of the held-out clips and their code perplexity
   (:func:`heldout_figures`: eval mode, masks and negatives drawn afresh from ``seed``, so the same before and
   after training) are recorded before training and after, next to chance, log(1 + negatives), and the mean
   training contrastive loss of the first and last tenth of the steps.
6. The model is saved as ``Wav2Vec2ForPreTraining`` (``AutoModel`` opens the folder as the bare
   ``Wav2Vec2Model`` encoder), with ``preprocessor_config.json`` and no tokenizer. Its config
   keeps transformers' fine-tuning SpecAugment default (``mask_time_prob`` 0.05), not the pretraining
   ``mask_prob``, so that a downstream fine-tuning in train mode does not mask half of every clip.

:func:`ensure` returns a model's folder after checking its manifest: a missing or unreadable manifest, a
missing file, a file whose sha256 differs, a different spec or a changed corpus (for instance a new Python,
whose stdlib is the corpus) means the entry is rebuilt, never used. ``load_model("zoo:NAME")`` goes through
:func:`ensure`, so a model is built on first use.

The zoo folder is ``$INTERLAYER_CACHE/zoo`` if ``INTERLAYER_CACHE`` is set, else
``$XDG_CACHE_HOME/interlayer/zoo``, else ``~/.cache/interlayer/zoo``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from filelock import FileLock, Timeout
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForPreTraining,
)
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from interlayer import arithmetic
from interlayer.atomic import read_json, write_json
from interlayer.data import Document, corpus_fingerprint, iter_documents, pack_contexts
from interlayer.errors import UserError
from interlayer.progress import progress_bar, stderr_console

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ARITH = "arith"
SPEECH = "synth:speech"
CORPORA = ("stdlib:code", "stdlib:docs", ARITH, SPEECH)
BOS, EOS = "<s>", "</s>"
MASK = "[MASK]"
KINDS = ("causal_lm", "mdlm", "wav2vec2")
WAV2VEC2 = "wav2vec2"
POS_CONV_GROUPS = 8
"""Groups of a ``wav2vec2`` model's convolutional position embedding (``d_model`` must be a multiple)."""
CODEBOOKS = 2
"""Codebooks (groups) of a ``wav2vec2`` quantiser; each code is ``d_model / 2 / CODEBOOKS`` wide."""
DIVERSITY_WEIGHT = 0.1
"""α of L = L_m + α · L_d (the paper's)."""
GUMBEL_TEMPERATURES = (2.0, 0.5)
"""The Gumbel-softmax temperature's start and floor (fairseq's and transformers' example's)."""
GUMBEL_FLOOR_AT = 0.7
"""The fraction of the steps at which the temperature reaches its floor."""


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines a zoo model; two builds of the same spec on one machine are identical."""

    name: str
    """The name after ``zoo:`` (``code-lm``)."""
    corpus: str
    """Training corpus: ``stdlib:code``, ``stdlib:docs``, ``arith`` (generated word problems) or ``synth:speech``
    (synthesised clips, for kind ``wav2vec2``)."""
    description: str
    """One line for ``interlayer zoo list``."""
    steps: int
    """Maximum optimiser steps (``arith`` may stop earlier, see ``stop_accuracy``)."""
    batch_size: int
    """Contexts (clips, for kind ``wav2vec2``) per optimiser step."""
    vocab_size: int = 4096
    """BPE vocabulary size, the two special tokens included."""
    d_model: int = 192
    """Hidden size."""
    layers: int = 4
    """Decoder blocks."""
    heads: int = 4
    """Attention heads (as many key/value heads: plain multi-head attention)."""
    intermediate: int = 512
    """Width of the SwiGLU MLP."""
    context_len: int = 256
    """Tokens per training context, and the model's maximum positions."""
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 50
    """Steps of linear warm-up from 0 to ``lr``."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to tensors of 2 or more dimensions (matrices, convolutions, the
    wav2vec2 quantiser's codevectors), not to biases and norms."""
    seed: int = 0
    """Seeds the initialisation, the batch order and the generated arithmetic corpus (the synthesised speech
    clips are always those of seed 0)."""
    max_documents: int = 0
    """Use only the first this many documents of each split and of each tokenizer corpus (0: all)."""
    val_contexts: int = 512
    """At most this many validation contexts (evenly spaced over all of them) are scored."""
    arith_train_problems: int = 0
    """``arith`` only: generated training problems (split "train")."""
    arith_val_problems: int = 0
    """``arith`` only: generated validation problems, for the validation loss."""
    probe_every: int = 0
    """``arith`` only: check greedy accuracy on the probe set every this many steps (0: never)."""
    probe_problems: int = 100
    """``arith`` only: the probe set, the first problems of the validation split."""
    stop_accuracy: float = 1.0
    """``arith`` only: stop training once the probe accuracy reaches this."""
    test_problems: int = 500
    """``arith`` only: held-out problems (split "test") scored after training."""
    reference_minutes: float = 0.0
    """Measured build time on a 2-core CPU, shown before a build as the estimate."""
    kind: str = "causal_lm"
    """``causal_lm`` (a Llama next-token LM), ``mdlm`` (a masked diffusion LM on ModernBERT blocks) or
    ``wav2vec2`` (a speech encoder pretrained as wav2vec 2.0 on ``synth:speech``)."""
    digits_clips: int = 0
    """``wav2vec2`` only: the first this many train-split clips of ``synth:digits`` are read."""
    styles_clips: int = 0
    """``wav2vec2`` only: the first this many train-split clips of ``synth:styles`` are read."""
    heldout_clips: int = 0
    """``wav2vec2`` only: the last this many clips read of each set are held out (loss figures), not trained on."""
    conv_dim: int = 0
    """``wav2vec2`` only: channels of each of the seven layers of the convolutional feature encoder."""
    pos_conv: int = 0
    """``wav2vec2`` only: kernel width (frames) of the convolutional position embedding."""
    codevectors: int = 0
    """``wav2vec2`` only: entries of each of the :data:`CODEBOOKS` codebooks of the quantiser."""
    mask_prob: float = 0.0
    """``wav2vec2`` only: span starts per frame times ``mask_length`` (transformers' ``mask_time_prob``); an
    upper bound on the masked fraction, as spans overlap."""
    mask_length: int = 0
    """``wav2vec2`` only: frames per masked span."""
    negatives: int = 0
    """``wav2vec2`` only: distractors per masked frame, drawn from the same clip's masked frames."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {self.corpus!r}")
        if (self.kind == WAV2VEC2) != (self.corpus == SPEECH):
            raise ValueError(f"kind {WAV2VEC2} goes with corpus {SPEECH}, and only it")
        if self.kind == WAV2VEC2:
            self._check_wav2vec2()
        for name in ("steps", "batch_size", "d_model", "layers", "heads", "intermediate", "val_contexts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if not 258 <= self.vocab_size <= 65536:
            raise ValueError(
                f"vocab_size must be in [258, 65536] (256 bytes + 2 specials), got {self.vocab_size}"
            )
        if self.context_len < 8:
            raise ValueError(f"context_len must be at least 8, got {self.context_len}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive, warmup_steps and weight_decay non-negative")
        if self.corpus == ARITH and min(self.arith_train_problems, self.arith_val_problems) < 1:
            raise ValueError("an arith spec needs arith_train_problems and arith_val_problems of at least 1")

    def _check_wav2vec2(self) -> None:
        for name in ("heldout_clips", "conv_dim", "pos_conv", "codevectors", "mask_length", "negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if min(self.digits_clips, self.styles_clips) <= self.heldout_clips:
            raise ValueError("digits_clips and styles_clips must exceed heldout_clips")
        if self.d_model % (2 * CODEBOOKS) or self.d_model % POS_CONV_GROUPS:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of {2 * CODEBOOKS} and of {POS_CONV_GROUPS}"
            )
        if not 0 < self.mask_prob <= 1:
            raise ValueError(f"mask_prob must be in (0, 1], got {self.mask_prob}")


REGISTRY: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in (
        ZooSpec(
            name="code-lm",
            corpus="stdlib:code",
            description="Llama LM on the stdlib's Python source",
            steps=500,
            batch_size=16,
            reference_minutes=6.5,
        ),
        ZooSpec(
            name="prose-lm",
            corpus="stdlib:docs",
            description="Llama LM on the stdlib's docstrings (English prose)",
            steps=800,
            batch_size=16,
            reference_minutes=10.5,
        ),
        ZooSpec(
            name="arith-lm",
            corpus=ARITH,
            description="Llama LM on arithmetic word problems, solving some held-out ones (for RL)",
            steps=800,
            batch_size=16,
            d_model=128,
            intermediate=344,
            arith_train_problems=60_000,
            arith_val_problems=1000,
            probe_every=100,
            stop_accuracy=0.35,
            reference_minutes=6.0,
        ),
        ZooSpec(
            name="code-mdlm",
            corpus="stdlib:code",
            description="masked diffusion LM (MDLM) on the stdlib's Python source, code-lm's tokenizer",
            kind="mdlm",
            steps=2000,
            batch_size=32,
            context_len=64,
            warmup_steps=100,
            reference_minutes=12.0,
        ),
        ZooSpec(
            name="speech-w2v2",
            corpus=SPEECH,
            description="wav2vec2 speech encoder pretrained on the synth:digits and synth:styles train clips",
            kind=WAV2VEC2,
            steps=1800,
            batch_size=16,
            d_model=128,
            heads=4,
            intermediate=256,
            lr=1e-3,
            warmup_steps=100,
            weight_decay=0.01,
            digits_clips=2000,
            styles_clips=2000,
            heldout_clips=100,
            conv_dim=64,
            pos_conv=32,
            codevectors=32,
            mask_prob=0.5,
            mask_length=5,
            negatives=20,
            reference_minutes=9.0,
        ),
    )
}


def cache_root() -> Path:
    """``$INTERLAYER_CACHE``, else ``$XDG_CACHE_HOME/interlayer``, else ``~/.cache/interlayer``."""
    if os.environ.get("INTERLAYER_CACHE"):
        return Path(os.environ["INTERLAYER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "interlayer"


def zoo_dir() -> Path:
    """The folder holding one subfolder per built zoo model."""
    return cache_root() / "zoo"


def get_spec(name: str) -> ZooSpec:
    """The registered spec called ``name`` (with or without the ``zoo:`` prefix)."""
    name = name.removeprefix("zoo:")
    if name not in REGISTRY:
        raise UserError(
            f"unknown zoo model {name!r}; choose one of {', '.join(REGISTRY)} (interlayer zoo list)"
        )
    return REGISTRY[name]


def llama_config(spec: ZooSpec, bos_id: int = 0, eos_id: int = 1) -> LlamaConfig:
    """The transformers config of the spec's model."""
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.d_model,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.context_len,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def masked_lm_config(
    vocab_size: int,
    d_model: int,
    layers: int,
    heads: int,
    intermediate: int,
    context_len: int,
    bos_id: int,
    eos_id: int,
) -> ModernBertConfig:
    """A bidirectional masked LM for masked diffusion: ModernBERT blocks with global attention in every layer,
    ``vocab_size`` rows (the [MASK] token included), tied embeddings, [MASK] = the last id."""
    config = ModernBertConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=context_len,
        layer_types=["full_attention"] * layers,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        cls_token_id=bos_id,
        sep_token_id=eos_id,
    )
    config.mask_token_id = vocab_size - 1  # not a ModernBertConfig field; saved in config.json all the same
    return config


def mdlm_config(spec: ZooSpec, bos_id: int = 0, eos_id: int = 1) -> ModernBertConfig:
    """The transformers config of an ``mdlm`` spec: its vocabulary plus [MASK] (id ``vocab_size``)."""
    return masked_lm_config(
        spec.vocab_size + 1,
        spec.d_model,
        spec.layers,
        spec.heads,
        spec.intermediate,
        spec.context_len,
        bos_id,
        eos_id,
    )


def wav2vec2_config(spec: ZooSpec) -> Wav2Vec2Config:
    """The transformers config of a ``wav2vec2`` spec: pre-norm blocks and layer-normed convolutions (the
    variant transformers' pretraining example requires), no LayerDrop, codes of width ``d_model / 2``."""
    return Wav2Vec2Config(
        hidden_size=spec.d_model,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate,
        conv_dim=(spec.conv_dim,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=spec.pos_conv,
        num_conv_pos_embedding_groups=POS_CONV_GROUPS,
        num_codevector_groups=CODEBOOKS,
        num_codevectors_per_group=spec.codevectors,
        codevector_dim=spec.d_model // 2,
        proj_codevector_dim=spec.d_model // 2,
        mask_time_length=spec.mask_length,
        num_negatives=spec.negatives,
        diversity_loss_weight=DIVERSITY_WEIGHT,
        layerdrop=0.0,
    )


def feature_extractor() -> Wav2Vec2FeatureExtractor:
    """The ``wav2vec2`` entries' preprocessing: 16 kHz mono, each clip normalised, zero padding, a mask."""
    from interlayer.speech.synthesis import SAMPLE_RATE

    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )


def new_model(spec: ZooSpec, bos_id: int = 0, eos_id: int = 1) -> PreTrainedModel:
    """A freshly initialised model of the spec's kind (from the global torch seed)."""
    if spec.kind == WAV2VEC2:
        return Wav2Vec2ForPreTraining(wav2vec2_config(spec))
    if spec.kind == "mdlm":
        return ModernBertForMaskedLM(mdlm_config(spec, bos_id, eos_id))
    return LlamaForCausalLM(llama_config(spec, bos_id, eos_id))


def parameter_count(spec: ZooSpec) -> int:
    """Number of parameters of the spec's model (tied embeddings counted once), without building it."""
    with torch.device("meta"):
        model = new_model(spec)
    return sum(p.numel() for p in model.parameters())


def _documents(corpus: str, split: str, limit: int) -> Iterator[Document]:
    """The first ``limit`` (0: all) documents of a stdlib corpus split."""
    docs = iter_documents(corpus, split)
    return itertools.islice(docs, limit) if limit else docs


def train_tokenizer(spec: ZooSpec) -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer of the module doc, trained on the train splits of the stdlib corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (
        doc.text
        for corpus in ("stdlib:code", "stdlib:docs")
        for doc in _documents(corpus, "train", spec.max_documents)
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=spec.context_len,
    )
    if spec.kind == "mdlm":  # the same BPE, so zoo:code-lm reads its samples token for token; [MASK] last
        fast.add_special_tokens({"mask_token": MASK})
    return fast


def _stack(tokenizer: Any, documents: list[Document], context_len: int) -> torch.Tensor:
    """All packed contexts of ``documents``, int64 [N, context_len]."""
    return torch.stack(list(pack_contexts(tokenizer, documents, context_len)))


def _evenly(contexts_NT: torch.Tensor, limit: int) -> torch.Tensor:
    """At most ``limit`` rows, evenly spaced (all of them when there are no more than ``limit``)."""
    if len(contexts_NT) <= limit:
        return contexts_NT
    return contexts_NT[torch.linspace(0, len(contexts_NT) - 1, limit).round().long()]


def ngram_baselines(train_NT: torch.Tensor, val_NT: torch.Tensor, vocab: int) -> dict[str, float]:
    """Unigram and bigram perplexities on the targets x_t (t ≥ 1) of the validation contexts.

    Counts come from the training contexts (targets t ≥ 1, pairs (x_{t−1}, x_t)), V = ``vocab``:

    - unigram, add-one: p(w) = (c(w) + 1) / (N + V);
    - bigram, interpolated Kneser–Ney with discount D = n₁ / (n₁ + 2 n₂) (n_r: bigram types seen r times):
      p(w | v) = max(c(v, w) − D, 0) / c(v) + D · N₁₊(v •) / c(v) · p_cont(w), and p_cont(w) when c(v) = 0,
      with p_cont(w) = (N₁₊(• w) + 1) / (Σ_u N₁₊(• u) + V) (add-one so that unseen words keep mass).

    Perplexity is exp of the mean negative log-probability.
    """
    prev_train, next_train = train_NT[:, :-1].reshape(-1), train_NT[:, 1:].reshape(-1)
    prev_val, next_val = val_NT[:, :-1].reshape(-1), val_NT[:, 1:].reshape(-1)
    unigram_V = torch.bincount(next_train, minlength=vocab).double()
    p_unigram = (unigram_V[next_val] + 1) / (unigram_V.sum() + vocab)
    pair_VV = torch.bincount(prev_train * vocab + next_train, minlength=vocab * vocab).view(vocab, vocab)
    n1, n2 = int((pair_VV == 1).sum()), int((pair_VV == 2).sum())
    discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
    seen_VV = pair_VV > 0
    continuation_V = seen_VV.sum(0).double()
    p_cont_V = (continuation_V + 1) / (continuation_V.sum() + vocab)
    context_V = pair_VV.sum(1).double()
    followers_V = seen_VV.sum(1).double()
    c_v, c_vw = context_V[prev_val], pair_VV[prev_val, next_val].double()
    safe_c_v = c_v.clamp(min=1)
    p_bigram = torch.where(
        c_v > 0,
        (c_vw - discount).clamp(min=0) / safe_c_v
        + discount * followers_V[prev_val] / safe_c_v * p_cont_V[next_val],
        p_cont_V[next_val],
    )
    return {
        "unigram_ppl": math.exp(-p_unigram.log().mean().item()),
        "bigram_ppl": math.exp(-p_bigram.log().mean().item()),
    }


def _lr_at(spec: ZooSpec, step: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then a cosine down to ``lr / 10`` at ``steps``."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def next_token_loss(
    model: PreTrainedModel, input_ids_BT: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of x_t given x_<t over positions t ≥ 1 (nats)."""
    logits_BTV = model(input_ids=input_ids_BT).logits
    return F.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]),
        input_ids_BT[:, 1:].reshape(-1),
        reduction=reduction,
    )


def _mdlm_loss(
    model: PreTrainedModel, input_ids_BT: torch.Tensor, generator: torch.Generator, reduction: str = "mean"
) -> torch.Tensor:
    """The MDLM negative ELBO per token (or summed); every position but the first (BOS) may be masked."""
    from interlayer.diffusion.schedule import mdlm_loss

    maskable_BT = torch.ones_like(input_ids_BT, dtype=torch.bool)
    maskable_BT[:, 0] = False
    return mdlm_loss(
        lambda x_t: model(input_ids=x_t).logits,
        input_ids_BT,
        int(model.config.mask_token_id),
        maskable_BT,
        generator,
        reduction=reduction,
    )


def _loss(
    model: PreTrainedModel, input_ids_BT: torch.Tensor, masks: torch.Generator, reduction: str = "mean"
) -> torch.Tensor:
    """The next-token loss of a causal LM, the MDLM loss (masks and times from ``masks``) of a masked LM."""
    if isinstance(model, LlamaForCausalLM):
        return next_token_loss(model, input_ids_BT, reduction)
    return _mdlm_loss(model, input_ids_BT, masks, reduction)


@torch.no_grad()
def validation_loss(
    model: PreTrainedModel, val_NT: torch.Tensor, batch_size: int = 16, seed: int = 0
) -> float:
    """Mean next-token cross-entropy (nats) over the targets t ≥ 1 of every validation context; for a masked
    diffusion LM the negative ELBO per token over the same positions (times and masks drawn from ``seed``)."""
    was_training = model.training
    model.eval()
    masks = torch.Generator().manual_seed(seed)
    total = sum(
        _loss(model, val_NT[i : i + batch_size], masks, reduction="sum").item()
        for i in range(0, len(val_NT), batch_size)
    )
    model.train(was_training)
    return total / (len(val_NT) * (val_NT.shape[1] - 1))


@dataclass
class _Corpus:
    """The packed training and validation contexts of a spec, and the fingerprint of where they came from."""

    train_NT: torch.Tensor
    val_NT: torch.Tensor
    fingerprint: str


def corpus_fingerprint_of(spec: ZooSpec) -> str:
    """Fingerprint of everything a build reads: the tokenizer's corpora and the training corpus.

    ``stdlib:*`` corpora use :func:`interlayer.data.corpus_fingerprint` (Python version, file names and
    sizes); the arithmetic corpus hashes the text of the first 1000 training problems (the generator's code);
    ``synth:speech`` hashes the speech corpus's version (:data:`interlayer.speech.corpus.VERSION`), as
    synthesising a clip to hash would need eSpeak NG wherever the zoo is listed.
    """
    if spec.corpus == SPEECH:
        from interlayer.speech.corpus import VERSION

        return hashlib.sha256(f"synth-speech-v{VERSION}".encode()).hexdigest()[:16]
    parts = [corpus_fingerprint("stdlib:code"), corpus_fingerprint("stdlib:docs")]
    if spec.corpus == ARITH:
        problems = arithmetic.generate_problems(1000, spec.seed, "train")
        parts.append(hashlib.sha256("\n".join(p.text for p in problems).encode()).hexdigest()[:16])
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]


def _corpus(spec: ZooSpec, tokenizer: Any) -> _Corpus:
    """Pack the spec's corpus into training and validation contexts."""
    if spec.corpus == ARITH:
        train_docs = arithmetic.problem_documents(
            arithmetic.generate_problems(spec.arith_train_problems, spec.seed, "train"), "train"
        )
        val_docs = arithmetic.problem_documents(
            arithmetic.generate_problems(spec.arith_val_problems, spec.seed, "validation"), "validation"
        )
    else:
        train_docs = list(_documents(spec.corpus, "train", spec.max_documents))
        val_docs = list(_documents(spec.corpus, "validation", spec.max_documents))
    return _Corpus(
        train_NT=_stack(tokenizer, train_docs, spec.context_len),
        val_NT=_evenly(_stack(tokenizer, val_docs, spec.context_len), spec.val_contexts),
        fingerprint=corpus_fingerprint_of(spec),
    )


def _optimizer(spec: ZooSpec, model: PreTrainedModel) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95))


def _batch_order(spec: ZooSpec, contexts: int) -> Iterator[torch.Tensor]:
    """Indices of each step's contexts: consecutive slices of a seeded permutation, renewed per epoch."""
    generator = torch.Generator().manual_seed(spec.seed)
    while True:
        order = torch.randperm(contexts, generator=generator)
        for lo in range(0, contexts - spec.batch_size + 1, spec.batch_size):
            yield order[lo : lo + spec.batch_size]


def _train(
    spec: ZooSpec,
    model: PreTrainedModel,
    tokenizer: Any,
    train_NT: torch.Tensor,
    on_step: Callable[[int, str], None],
) -> dict[str, Any]:
    """The training loop; returns what it did (steps taken, tokens seen, probe accuracies)."""
    if len(train_NT) < spec.batch_size:
        raise UserError(
            f"zoo:{spec.name}: {len(train_NT)} training contexts, fewer than batch_size {spec.batch_size}"
        )
    optimizer = _optimizer(spec, model)
    probe = (
        arithmetic.generate_problems(spec.probe_problems, spec.seed, "validation") if spec.probe_every else []
    )
    probes: list[dict[str, float]] = []
    model.train()
    masks = torch.Generator().manual_seed(spec.seed)
    step = 0
    for step, index_B in zip(range(1, spec.steps + 1), _batch_order(spec, len(train_NT)), strict=False):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(spec, step - 1)
        loss = _loss(model, train_NT[index_B], masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        status = f"loss {loss.item():.3f}"
        if probe and step % spec.probe_every == 0:
            model.eval()
            accuracy = arithmetic.evaluate_accuracy(model, tokenizer, probe).accuracy
            model.train()
            probes.append({"step": step, "accuracy": accuracy})
            status += f" probe acc {accuracy:.2f}"
            if accuracy >= spec.stop_accuracy:
                on_step(step, status)
                break
        on_step(step, status)
    model.eval()
    return {"steps": step, "train_tokens": step * spec.batch_size * spec.context_len, "probes": probes}


@contextlib.contextmanager
def _numpy_random(rng: np.random.RandomState) -> Iterator[None]:
    """Run the block with numpy's global generator in ``rng``'s state (transformers' mask and negative
    samplers draw from the global one), then hand the advanced state back to ``rng`` and restore the global."""
    saved = np.random.get_state()
    np.random.set_state(rng.get_state())
    try:
        yield
    finally:
        rng.set_state(np.random.get_state())
        np.random.set_state(saved)


def speech_clips(spec: ZooSpec) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The training clips and the held-out clips of a ``wav2vec2`` spec (float32 at 16 kHz): of each set's first
    ``digits_clips`` / ``styles_clips`` train-split clips, the last ``heldout_clips`` are held out."""
    from interlayer.speech.corpus import embedded_set

    train: list[np.ndarray] = []
    heldout: list[np.ndarray] = []
    for name, size in (("digits", spec.digits_clips), ("styles", spec.styles_clips)):
        waves = embedded_set(name, "train", size).waves
        train += waves[: size - spec.heldout_clips]
        heldout += waves[size - spec.heldout_clips :]
    return train, heldout


def speech_batch(
    spec: ZooSpec,
    model: Wav2Vec2ForPreTraining,
    extractor: Wav2Vec2FeatureExtractor,
    waves: list[np.ndarray],
    rng: np.random.RandomState,
) -> dict[str, torch.Tensor]:
    """The pretraining inputs of ``waves``: normalised, zero-padded samples and their attention mask, the
    masked frames and the negatives' flat (clip · frames + frame) indices, masks and negatives drawn from
    ``rng`` (steps 2 and 3 of the module doc)."""
    batch = extractor(waves, sampling_rate=extractor.sampling_rate, padding=True, return_tensors="pt")
    frames = int(model._get_feat_extract_output_lengths(batch["input_values"].shape[1]))
    frames_BT = model._get_feature_vector_attention_mask(frames, batch["attention_mask"])
    with _numpy_random(rng):
        masked_BT = _compute_mask_indices(
            (len(waves), frames), spec.mask_prob, spec.mask_length, attention_mask=frames_BT, min_masks=2
        )
        negatives_BTK = _sample_negative_indices((len(waves), frames), spec.negatives, masked_BT)
    return {
        "input_values": batch["input_values"],
        "attention_mask": batch["attention_mask"],
        "mask_time_indices": torch.from_numpy(masked_BT),
        "sampled_negative_indices": torch.from_numpy(negatives_BTK).long(),
    }


def _length_batches(spec: ZooSpec, waves: list[np.ndarray]) -> Iterator[list[int]]:
    """Indices of each step's clips: the clips sorted by length (ties by index) cut into batches of
    ``batch_size`` consecutive ones (a shorter last batch dropped), visited in a seeded random order renewed
    per epoch; similar lengths pad little, and negatives come from within a clip, so fixed batches lose nothing."""
    by_length = sorted(range(len(waves)), key=lambda i: (len(waves[i]), i))
    batches = [
        by_length[lo : lo + spec.batch_size]
        for lo in range(0, len(waves) - spec.batch_size + 1, spec.batch_size)
    ]
    generator = torch.Generator().manual_seed(spec.seed)
    while True:
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]


def gumbel_temperature(spec: ZooSpec, step: int) -> float:
    """max(2 · d^step, 0.5) with d = 0.25^(1 / (0.7 · steps)): 2 at step 0, 0.5 from 70% of the steps on."""
    start, floor = GUMBEL_TEMPERATURES
    decay = (floor / start) ** (1 / (GUMBEL_FLOOR_AT * spec.steps))
    return max(start * decay**step, floor)


@torch.no_grad()
def heldout_figures(
    spec: ZooSpec, model: Wav2Vec2ForPreTraining, extractor: Wav2Vec2FeatureExtractor, waves: list[np.ndarray]
) -> dict[str, float]:
    """The pretraining objective on ``waves`` in eval mode (argmax codes), in batches of ``batch_size`` clips in
    order, masks and negatives from a generator seeded with ``seed`` (the same draws on every call).

    ``contrastive_loss``: Σ L_m / number of masked frames. A distractor whose code equals the target's is left
    out of L_m (transformers masks it), so a codebook that collapsed lowers the loss too: hence
    ``code_perplexity``, the mean over batches of Σ over codebooks of exp(entropy of the masked frames' code
    histogram) (at most ``CODEBOOKS · codevectors``; ``CODEBOOKS`` when every frame gets the same codes)."""
    was_training = model.training
    model.eval()
    rng = np.random.RandomState(spec.seed)
    total, masked, perplexities = 0.0, 0, []
    for lo in range(0, len(waves), spec.batch_size):
        batch = speech_batch(spec, model, extractor, waves[lo : lo + spec.batch_size], rng)
        output = model(**batch)
        total += float(output.contrastive_loss)
        masked += int(batch["mask_time_indices"].sum())
        perplexities.append(float(output.codevector_perplexity))
    model.train(was_training)
    return {"contrastive_loss": total / masked, "code_perplexity": sum(perplexities) / len(perplexities)}


def _train_wav2vec2(
    spec: ZooSpec,
    model: Wav2Vec2ForPreTraining,
    extractor: Wav2Vec2FeatureExtractor,
    waves: list[np.ndarray],
    on_step: Callable[[int, str], None],
) -> dict[str, Any]:
    """The pretraining loop of the module doc; returns the steps and the mean training contrastive loss per
    masked frame over the first and the last tenth of them."""
    if len(waves) < spec.batch_size:
        raise UserError(
            f"zoo:{spec.name}: {len(waves)} training clips, fewer than batch_size {spec.batch_size}"
        )
    optimizer = _optimizer(spec, model)
    masks = np.random.RandomState(spec.seed)
    contrastive: list[float] = []
    model.train()
    for step, index_B in zip(range(1, spec.steps + 1), _length_batches(spec, waves), strict=False):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(spec, step - 1)
        model.set_gumbel_temperature(gumbel_temperature(spec, step - 1))  # type: ignore[arg-type]
        batch = speech_batch(spec, model, extractor, [waves[i] for i in index_B], masks)
        output = model(**batch)
        masked = int(batch["mask_time_indices"].sum())
        optimizer.zero_grad(set_to_none=True)
        (output.loss / masked).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        contrastive.append(float(output.contrastive_loss.detach()) / masked)
        perplexity = float(output.codevector_perplexity.detach())
        on_step(step, f"contrastive {contrastive[-1]:.3f} code perplexity {perplexity:.0f}")
    model.eval()
    tenth = max(1, spec.steps // 10)
    return {
        "steps": spec.steps,
        "train_contrastive_first_tenth": sum(contrastive[:tenth]) / tenth,
        "train_contrastive_last_tenth": sum(contrastive[-tenth:]) / tenth,
    }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` except the manifest, by relative path."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


_ADDED_LATER = (
    "kind",
    "digits_clips",
    "styles_clips",
    "heldout_clips",
    "conv_dim",
    "pos_conv",
    "codevectors",
    "mask_prob",
    "mask_length",
    "negatives",
)
"""Spec fields added after entries were first built."""


def _built_by(spec_fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of a spec that determine the built files (all but the description and the time estimate);
    those of :data:`_ADDED_LATER` only when they differ from their default, so that entries built before the
    fields existed stay valid."""
    defaults = {f.name: f.default for f in fields(ZooSpec)}
    return {
        k: v
        for k, v in spec_fields.items()
        if k not in ("description", "reference_minutes") and not (k in _ADDED_LATER and v == defaults[k])
    }


def check_entry(folder: Path, spec: ZooSpec) -> str | None:
    """Why the cache entry at ``folder`` cannot be used for ``spec``, or None when it is complete and intact."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (missing or partial build)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files: dict[str, str] = manifest["files"]
        built_spec = manifest["spec"]
        fingerprint = manifest["corpus_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    if manifest.get("format_version") != FORMAT_VERSION or _built_by(built_spec) != _built_by(asdict(spec)):
        return "it was built from a different spec"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} is corrupt (sha256 differs from the manifest)"
    preprocessing = "preprocessor_config.json" if spec.kind == WAV2VEC2 else "tokenizer.json"
    if not {"config.json", "model.safetensors", preprocessing} <= files.keys():
        return f"the manifest lists no model, config or {preprocessing}"
    if fingerprint != corpus_fingerprint_of(spec):
        return "its corpus changed (a different Python or stdlib)"
    return None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a built entry."""
    manifest: dict[str, Any] = read_json(folder / MANIFEST, "zoo manifest")
    return manifest


def _remove_abandoned_builds(root: Path, name: str) -> None:
    """Delete temporary folders of builds of ``name`` whose process (the pid in the folder name) is gone."""
    for folder in root.glob(f".build-{name}-*"):
        pid = folder.name.removeprefix(f".build-{name}-").split("-")[0]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(folder, ignore_errors=True)
            except PermissionError:
                continue


@contextlib.contextmanager
def _build_lock(root: Path, name: str, progress: bool) -> Iterator[None]:
    """Hold ``root/.<name>.lock`` (an OS file lock, so it is released when the process dies), telling the
    user when another process holds it.

    ``filelock`` (already installed with torch and huggingface_hub) is used rather than ``fcntl`` so that
    the lock also works on Windows.
    """
    lock = FileLock(root / f".{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            stderr_console.print(f"zoo:{name}: another process is building it; waiting for it to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build(
    spec_or_name: ZooSpec | str, root: Path | None = None, progress: bool = True, force: bool = True
) -> Path:
    """Build a zoo model into ``root / spec.name`` (``root`` defaults to :func:`zoo_dir`); return the folder.

    One process at a time builds a given model (a file lock in ``root``); with ``force=False`` an entry that
    is intact once the lock is held (another process may just have built it) is returned as it is. The model
    is trained in ``root/.build-<name>-<pid>-*`` and renamed into place only after its manifest is written; a
    previous entry under the final name is replaced only then.
    """
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    root = zoo_dir() if root is None else Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.name
    with _build_lock(root, spec.name, progress):
        problem = check_entry(final, spec) if final.exists() else "not built yet"
        if problem is None and not force:
            return final
        if progress:
            stderr_console.print(
                f"zoo:{spec.name}: {problem or 'rebuild asked for'}; building it into {final} "
                f"(about {spec.reference_minutes:g} min on 2 CPU cores, once)"
            )
        _remove_abandoned_builds(root, spec.name)
        work = Path(tempfile.mkdtemp(prefix=f".build-{spec.name}-{os.getpid()}-", dir=root))
        deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            torch.use_deterministic_algorithms(True)
            with progress_bar(f"building zoo:{spec.name}", spec.steps, visible=progress) as bar:
                _build_into(work, spec, lambda step, status: bar.show(step, status))
            _install(work, final)
        finally:
            torch.use_deterministic_algorithms(deterministic)
            shutil.rmtree(work, ignore_errors=True)
    return final


def _build_into(folder: Path, spec: ZooSpec, show: Callable[[int, str], None]) -> None:
    """Train, evaluate and save the spec's model into ``folder``, manifest last."""
    if spec.kind == WAV2VEC2:
        _build_wav2vec2_into(folder, spec, show)
        return
    started = time.perf_counter()
    show(0, "training tokenizer")
    tokenizer = train_tokenizer(spec)
    show(0, "tokenizing")
    corpus = _corpus(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = new_model(spec, tokenizer.bos_token_id, tokenizer.eos_token_id)
    trained = _train(spec, model, tokenizer, corpus.train_NT, show)
    show(trained["steps"], "evaluating")
    val_loss = validation_loss(model, corpus.val_NT, seed=spec.seed)
    metrics: dict[str, Any] = {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        **ngram_baselines(corpus.train_NT, corpus.val_NT, spec.vocab_size),
    }
    if spec.corpus == ARITH:
        test = arithmetic.generate_problems(spec.test_problems, spec.seed, "test")
        metrics["arith_test"] = asdict(arithmetic.evaluate_accuracy(model, tokenizer, test))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    figures = {
        "train_contexts": len(corpus.train_NT),
        "val_contexts": len(corpus.val_NT),
        "val_tokens": corpus.val_NT[:, 1:].numel(),
        **trained,
        **metrics,
    }
    _write_manifest(folder, spec, corpus.fingerprint, model, figures, started)


def _build_wav2vec2_into(folder: Path, spec: ZooSpec, show: Callable[[int, str], None]) -> None:
    """Pretrain, evaluate and save a ``wav2vec2`` spec's encoder and feature extractor into ``folder``."""
    started = time.perf_counter()
    show(0, "reading the speech clips")
    train, heldout = speech_clips(spec)
    extractor = feature_extractor()
    torch.manual_seed(spec.seed)
    model = Wav2Vec2ForPreTraining(wav2vec2_config(spec))
    show(0, "scoring the held-out clips")
    start = heldout_figures(spec, model, extractor, heldout)
    trained = _train_wav2vec2(spec, model, extractor, train, show)
    show(spec.steps, "evaluating")
    end = heldout_figures(spec, model, extractor, heldout)
    figures = {
        "train_clips": len(train),
        "train_audio_seconds": sum(len(w) for w in train) / extractor.sampling_rate,
        "heldout_clips": len(heldout),
        **trained,
        **{f"heldout_{k}_start": v for k, v in start.items()},
        **{f"heldout_{k}": v for k, v in end.items()},
        "chance_contrastive_loss": math.log(1 + spec.negatives),
    }
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    _write_manifest(folder, spec, corpus_fingerprint_of(spec), model, figures, started)


def _write_manifest(
    folder: Path,
    spec: ZooSpec,
    fingerprint: str,
    model: PreTrainedModel,
    figures: dict[str, Any],
    started: float,
) -> None:
    """Write ``folder/manifest.json``, the last file of a build: spec, corpus fingerprint, versions, seed,
    parameters, the build's figures, seconds since ``started``, and the sha256 of every other file."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "spec": asdict(spec),
        "corpus": spec.corpus,
        "corpus_fingerprint": fingerprint,
        "python": sys.version,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "seed": spec.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        **figures,
        "build_seconds": time.perf_counter() - started,
        "files": _hash_files(folder),
    }
    write_json(folder / MANIFEST, manifest)


def _install(work: Path, final: Path) -> None:
    """Rename the finished build ``work`` to ``final``, replacing what was there only after the rename."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, final)


def ensure(name: str, root: Path | None = None, progress: bool = True) -> Path:
    """The folder of zoo model ``name``, built now if it is missing, partial, corrupt or stale."""
    spec = get_spec(name)
    root = zoo_dir() if root is None else Path(root)
    folder = root / spec.name
    if folder.exists() and check_entry(folder, spec) is None:
        return folder
    return build(spec, root, progress=progress, force=False)


def entries(root: Path | None = None) -> list[dict[str, Any]]:
    """One row per registered model: name, corpus, parameters, whether it is built, and its figures."""
    root = zoo_dir() if root is None else Path(root)
    rows = []
    for spec in REGISTRY.values():
        folder = root / spec.name
        built = folder.exists() and check_entry(folder, spec) is None
        row: dict[str, Any] = {
            "name": spec.name,
            "corpus": spec.corpus,
            "parameters": parameter_count(spec),
            "built": built,
            "description": spec.description,
        }
        if built:
            manifest = read_manifest(folder)
            shown = ("val_ppl", "unigram_ppl", "bigram_ppl", "heldout_contrastive_loss", "build_seconds")
            row |= {k: manifest[k] for k in shown if k in manifest}
            if "arith_test" in manifest:
                row["arith_accuracy"] = manifest["arith_test"]["correct"] / manifest["arith_test"]["total"]
        rows.append(row)
    return rows
