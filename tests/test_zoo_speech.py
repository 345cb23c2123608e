"""The zoo's wav2vec2 kind through its real build path with a tiny spec: files, encoder reload, the figures,
the objective descending, determinism, train-split-only data, the spec checks and the CLI listing."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import run_cli  # the shared in-process CLI runner
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForPreTraining,
    Wav2Vec2Model,
)

from interlayer import zoo
from interlayer.models import head_kind
from interlayer.speech import corpus

TINY_SPEECH = zoo.ZooSpec(
    name="tiny-speech",
    corpus=zoo.SPEECH,
    description="a tiny test speech encoder",
    kind="wav2vec2",
    steps=10,
    batch_size=4,
    d_model=32,
    layers=1,
    heads=2,
    intermediate=64,
    lr=1e-3,
    warmup_steps=1,
    weight_decay=0.01,
    digits_clips=3,
    styles_clips=3,
    heldout_clips=1,
    conv_dim=16,
    pos_conv=8,
    codevectors=16,
    mask_prob=0.5,
    mask_length=3,
    negatives=5,
)
"""Two digits and two styles clips trained on (one batch), one of each held out."""
PRETRAINING_HEADS = ("quantizer.", "project_hid.", "project_q.")


@pytest.fixture(scope="module")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache (``INTERLAYER_CACHE``) for the module: the clips are synthesised there."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERLAYER_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def built(speech_cache: Path) -> Path:
    return zoo.build(TINY_SPEECH, speech_cache / "zoo", progress=False)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def fresh_model(spec: zoo.ZooSpec) -> Wav2Vec2ForPreTraining:
    """The model the build starts from: the spec's config initialised from ``seed``."""
    torch.manual_seed(spec.seed)
    return Wav2Vec2ForPreTraining(zoo.wav2vec2_config(spec))


def objective(model: Wav2Vec2ForPreTraining, waves: list[np.ndarray]) -> tuple[float, float]:
    """(L, L_m) per masked frame on ``waves`` in train mode, with masks, negatives, Gumbel noise and dropout
    drawn from fixed seeds: the same draws for every model of one config."""
    batch = zoo.speech_batch(TINY_SPEECH, model, zoo.feature_extractor(), waves, np.random.RandomState(123))
    masked = int(batch["mask_time_indices"].sum())
    torch.manual_seed(123)
    model.train()
    with torch.no_grad():
        output = model(**batch)
    model.eval()
    return float(output.loss) / masked, float(output.contrastive_loss) / masked


def test_speech_build_writes_an_encoder_layout_without_tokenizer_and_a_complete_manifest(built: Path) -> None:
    manifest = manifest_of(built)
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "preprocessor_config.json"}
    for name, digest in manifest["files"].items():
        assert zoo.sha256_file(built / name) == digest
    assert manifest["spec"] == asdict(TINY_SPEECH) and manifest["steps"] == 10
    assert manifest["parameters"] == zoo.parameter_count(TINY_SPEECH)
    assert manifest["train_clips"] == 4 and manifest["heldout_clips"] == 2
    assert manifest["chance_contrastive_loss"] == pytest.approx(math.log(6))
    assert (
        manifest["heldout_code_perplexity_start"] != manifest["heldout_code_perplexity"]
    )  # training moved it
    assert manifest["corpus_fingerprint"] == zoo.corpus_fingerprint_of(TINY_SPEECH)
    assert zoo.check_entry(built, TINY_SPEECH) is None
    assert not list(built.parent.glob(".build-*"))


def test_speech_folder_opens_as_a_bare_wav2vec2_encoder_with_its_feature_extractor(built: Path) -> None:
    encoder, info = AutoModel.from_pretrained(built, output_loading_info=True)
    assert type(encoder) is Wav2Vec2Model and head_kind(AutoConfig.from_pretrained(built)) == "encoder"
    assert not info["missing_keys"] and not info["mismatched_keys"]  # nothing newly initialised
    assert info["unexpected_keys"] and all(k.startswith(PRETRAINING_HEADS) for k in info["unexpected_keys"])
    trained = Wav2Vec2ForPreTraining.from_pretrained(built).wav2vec2.state_dict()
    for name, weight in encoder.state_dict().items():
        assert torch.equal(weight, trained[name]), name
    extractor = AutoFeatureExtractor.from_pretrained(built)
    assert isinstance(extractor, Wav2Vec2FeatureExtractor) and extractor.sampling_rate == 16_000
    assert extractor.do_normalize and extractor.return_attention_mask
    inputs = extractor([np.sin(np.arange(16_000) / 7.0)], sampling_rate=16_000, return_tensors="pt")
    assert inputs["input_values"].std().item() == pytest.approx(1.0, abs=1e-3)  # normalised per clip
    with torch.no_grad():
        output = encoder(**inputs, output_hidden_states=True)
    assert len(output.hidden_states) == TINY_SPEECH.layers + 1
    assert output.last_hidden_state.shape == (1, 49, 32)  # 16,000 samples at 320 per frame


def test_speech_figures_are_reproduced_and_training_descends_on_the_same_batch(
    built: Path, speech_cache: Path
) -> None:
    manifest = manifest_of(built)
    train, heldout = zoo.speech_clips(TINY_SPEECH)
    fresh, trained = fresh_model(TINY_SPEECH), Wav2Vec2ForPreTraining.from_pretrained(built)
    extractor = zoo.feature_extractor()
    start = zoo.heldout_figures(TINY_SPEECH, fresh, extractor, heldout)
    end = zoo.heldout_figures(TINY_SPEECH, trained, extractor, heldout)
    assert manifest["heldout_contrastive_loss_start"] == pytest.approx(start["contrastive_loss"], rel=1e-4)
    assert manifest["heldout_contrastive_loss"] == pytest.approx(end["contrastive_loss"], rel=1e-4)
    assert manifest["heldout_code_perplexity"] == pytest.approx(end["code_perplexity"], rel=1e-4)
    # Ten steps on the one training batch lower its objective and its contrastive part, under the same draws.
    (total_before, contrastive_before), (total_after, contrastive_after) = (
        objective(fresh, train),
        objective(trained, train),
    )
    assert total_after < total_before - 0.2 and contrastive_after < contrastive_before - 0.2


def test_same_seed_speech_builds_identical_weights(built: Path, tmp_path: Path) -> None:
    again = zoo.build(TINY_SPEECH, tmp_path, progress=False)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert zoo.sha256_file(again / name) == zoo.sha256_file(built / name), name
    other = zoo.build(replace(TINY_SPEECH, seed=1), tmp_path / "other", progress=False)
    assert zoo.sha256_file(other / "model.safetensors") != zoo.sha256_file(built / "model.safetensors")


def test_speech_clips_come_from_the_train_split_and_hold_out_the_last(
    speech_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str, int]] = []
    embedded_set = corpus.embedded_set

    def recording(name: str, split: str, size: int, seed: int = 0) -> corpus.SpeechSet:
        asked.append((name, split, size))
        return embedded_set(name, split, size, seed)

    monkeypatch.setattr(corpus, "embedded_set", recording)
    train, heldout = zoo.speech_clips(TINY_SPEECH)
    assert asked == [("digits", "train", 3), ("styles", "train", 3)]
    digits, styles = embedded_set("digits", "train", 3).waves, embedded_set("styles", "train", 3).waves
    assert all(np.array_equal(a, b) for a, b in zip(train, digits[:2] + styles[:2], strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(heldout, [digits[2], styles[2]], strict=True))


def test_mask_draws_are_seeded_and_leave_numpy_global_generator_alone(speech_cache: Path) -> None:
    train, _ = zoo.speech_clips(TINY_SPEECH)
    model, extractor = fresh_model(TINY_SPEECH), zoo.feature_extractor()
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    first = zoo.speech_batch(TINY_SPEECH, model, extractor, train, np.random.RandomState(0))
    second = zoo.speech_batch(TINY_SPEECH, model, extractor, train, np.random.RandomState(0))
    assert np.random.rand() == expected
    for key in ("mask_time_indices", "sampled_negative_indices"):
        assert torch.equal(first[key], second[key]), key
    masked_BT, frames_BT = (
        first["mask_time_indices"],
        model._get_feature_vector_attention_mask(
            first["mask_time_indices"].shape[1], first["attention_mask"]
        ),
    )
    assert not (masked_BT & ~frames_BT).any() and (masked_BT.sum(1) >= 2 * 3).all()  # in the clip, 2+ spans
    negatives_BTK = first["sampled_negative_indices"]
    rows_BTK = torch.arange(len(train))[:, None, None] * masked_BT.shape[1]
    chosen = negatives_BTK[masked_BT.bool()] - rows_BTK.expand_as(negatives_BTK)[masked_BT.bool()]
    clip_of = torch.arange(len(train))[:, None].expand_as(masked_BT)[masked_BT.bool()]
    assert ((chosen >= 0) & (chosen < masked_BT.shape[1])).all()  # no index wrapping into another clip
    own_frame = masked_BT.nonzero()[:, 1]
    assert (chosen != own_frame[:, None]).all()  # never the frame itself
    assert masked_BT[
        clip_of[:, None].expand_as(chosen), chosen
    ].all()  # distractors: masked frames, same clip


def test_speech_spec_checks() -> None:
    with pytest.raises(ValueError, match="goes with corpus synth:speech"):
        replace(TINY_SPEECH, corpus="stdlib:code")
    with pytest.raises(ValueError, match="goes with corpus synth:speech"):
        replace(TINY_SPEECH, kind="causal_lm")
    with pytest.raises(ValueError, match="must exceed heldout_clips"):
        replace(TINY_SPEECH, heldout_clips=3)
    with pytest.raises(ValueError, match="multiple of 4 and of 8"):
        replace(TINY_SPEECH, d_model=36, heads=1)
    with pytest.raises(ValueError, match="mask_prob"):
        replace(TINY_SPEECH, mask_prob=0.0)


def test_registered_speech_entry_keeps_the_320x_rate_and_a_width_for_16_heads() -> None:
    spec = zoo.get_spec("zoo:speech-w2v2")
    config = zoo.wav2vec2_config(spec)
    assert math.prod(config.conv_stride) == 320 and config.hidden_size % 16 == 0
    assert config.mask_time_prob == pytest.approx(0.05)  # transformers' fine-tuning default, not mask_prob
    assert spec.digits_clips > spec.heldout_clips and zoo.parameter_count(spec) < 1_000_000


def test_speech_entry_is_listed_built_and_checked_without_a_tokenizer(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache" / "zoo"
    shutil.copytree(built, root / "tiny-speech")
    monkeypatch.setitem(zoo.REGISTRY, "tiny-speech", TINY_SPEECH)
    monkeypatch.setenv("INTERLAYER_CACHE", str(tmp_path / "cache"))
    code, out, _ = run_cli(["zoo", "list", "--json"], capsys)
    rows = {row["name"]: row for row in json.loads(out.splitlines()[-1])["models"]}
    assert code == 0 and rows["tiny-speech"]["built"] is True and "val_ppl" not in rows["tiny-speech"]
    assert rows["tiny-speech"]["heldout_contrastive_loss"] == manifest_of(built)["heldout_contrastive_loss"]
    assert rows["speech-w2v2"]["parameters"] == zoo.parameter_count(zoo.REGISTRY["speech-w2v2"])
    code, out, _ = run_cli(["zoo", "list"], capsys)
    assert code == 0 and "tiny-speech" in out
    (root / "tiny-speech" / "preprocessor_config.json").unlink()
    assert zoo.check_entry(root / "tiny-speech", TINY_SPEECH) == "preprocessor_config.json is missing"
