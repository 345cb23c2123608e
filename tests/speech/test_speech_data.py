"""Synthesised speech (deterministic, varied, cached), audio files (rates, empty, silent, channels), the folder
and records loaders, and speech encoders in load_model, sites and activations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from interlayer.activations import audio_batches
from interlayer.audio import read_audio
from interlayer.errors import UserError
from interlayer.models import load_model
from interlayer.sites import model_sites
from interlayer.speech.corpus import STYLES, WORDS, embedded_set, synthesize_set
from interlayer.speech.datasets import from_records, load_speech
from interlayer.speech.synthesis import SAMPLE_RATE, Voice, synthesize


def test_the_voice_changes_the_sound() -> None:
    slow = synthesize("three one four", Voice("m1", rate=100))
    fast = synthesize("three one four", Voice("m1", rate=250))
    assert 1.6 < len(slow) / len(fast) < 3.5  # 2.5x the words per minute: about that much shorter
    assert slow.dtype == np.float32 and 0.1 < np.abs(slow).max() <= 1.0
    high = synthesize("three one four", Voice("m1", rate=100, pitch=90))
    low = synthesize("three one four", Voice("m1", rate=100, pitch=10))

    def crossings(wave: np.ndarray) -> int:  # zero crossings of the voiced signal: higher pitch, more
        return int((np.diff(np.sign(wave[np.abs(wave) > 0.01])) != 0).sum())

    assert crossings(high) > 1.2 * crossings(low)


def test_sets_are_reproducible_prefix_stable_cached_and_labelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERLAYER_CACHE", str(tmp_path / "a"))
    synthesize("seven", Voice("f2"))  # this process's eSpeak state does not reach the cached sets
    small, large = embedded_set("digits", "train", 3), embedded_set("digits", "train", 6)
    assert small.texts == large.texts[:3]
    assert all(np.array_equal(a, b) for a, b in zip(small.waves, large.waves[:3], strict=True))
    assert all(set(t) <= set("0123456789 ") and 2 <= len(t.split()) <= 5 for t in large.texts)
    assert sorted(p.name for p in (tmp_path / "a" / "speech").iterdir())[:2] == [
        "digits-train-0-3-v1.json",
        "digits-train-0-3-v1.safetensors",
    ]
    monkeypatch.setenv("INTERLAYER_CACHE", str(tmp_path / "b"))  # built again from nothing: the same clips
    again = embedded_set("digits", "train", 3)
    assert all(np.array_equal(a, b) for a, b in zip(again.waves, small.waves, strict=True))
    styles = embedded_set("styles", "train", 8)
    assert set(styles.labels) <= set(STYLES) and len(set(styles.labels)) > 1
    assert all(t in WORDS for t in styles.texts)
    fresh = synthesize_set("styles", "train", 8)  # in this process: the same labels, samples within ~1 ms
    assert fresh.labels == styles.labels
    assert all(abs(len(a) - len(b)) < 64 for a, b in zip(fresh.waves, styles.waves, strict=True))


def _wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    wavfile.write(path, rate, samples)
    return path


def test_audio_files_are_converted_checked_and_resampled_only_on_request(tmp_path: Path) -> None:
    tone = (0.5 * np.sin(np.arange(8000) / 5.0)).astype(np.float32)
    pcm = _wav(tmp_path / "pcm.wav", (tone * 32767).astype(np.int16))
    assert np.allclose(read_audio(pcm), tone, atol=1e-4)
    stereo = _wav(tmp_path / "stereo.wav", np.stack([tone, np.zeros_like(tone)], axis=1))
    assert np.allclose(read_audio(stereo), tone / 2, atol=1e-6)
    other = _wav(tmp_path / "other.wav", tone, rate=8000)
    with pytest.raises(
        UserError, match="other.wav: the audio is at 8000 Hz, the model takes 16000 Hz; pass --resample"
    ):
        read_audio(other)
    assert len(read_audio(other, resample_to_target=True)) == 16000
    with pytest.raises(UserError, match="empty.wav: the audio is empty"):
        read_audio(_wav(tmp_path / "empty.wav", np.zeros(0, np.int16)))
    with pytest.raises(UserError, match="silent.wav: the audio is silent"):
        read_audio(_wav(tmp_path / "silent.wav", np.zeros(4000, np.int16)))
    (tmp_path / "text.txt").write_text("hello")
    with pytest.raises(UserError, match="not an audio file"):
        read_audio(tmp_path / "text.txt")


def speech_folder(root: Path, labels: dict[str, list[str]]) -> Path:
    """A folder of synthesised WAV clips with metadata.jsonl: ``labels[split]`` gives each clip's style label."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for split, names in labels.items():
        for i, label in enumerate(names):
            wave = synthesize(
                "yes" if i % 2 else "water", Voice("m3", **{k: v[0] for k, v in STYLES[label].items()})
            )
            file = f"{split}-{i}.wav"
            wavfile.write(root / file, SAMPLE_RATE, (wave * 32767).astype(np.int16))
            lines.append(json.dumps({"file_name": file, "label": label, "split": split, "text": "yes"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_the_folder_and_records_loaders(tmp_path: Path) -> None:
    folder = speech_folder(tmp_path / "set", {"train": ["calm", "sad", "calm"], "test": ["sad"]})
    train = load_speech(str(folder), "train")
    assert train.labels == ["calm", "sad", "calm"] and len(train) == 3 and train.texts == ["yes"] * 3
    assert load_speech(str(folder), "test").labels == ["sad"]
    with pytest.raises(UserError, match="not found"):
        load_speech(str(tmp_path / "missing"), "train")
    rows = [
        {"audio": {"array": np.sin(np.arange(800) / 3.0), "sampling_rate": 8000}, "label": 3, "text": "hi"}
    ]
    with pytest.raises(UserError, match="row 0: the audio is at 8000 Hz"):
        from_records(rows, "hf:x", 0, False, "label", "text")
    speech = from_records(rows, "hf:x", 0, True, "label", "text")
    assert speech.labels == ["3"] and speech.texts == ["hi"] and len(speech.waves[0]) == 1600

    class Decoder:  # what datasets >= 4 gives: torchcodec's AudioDecoder, indexable but not a dict
        def __getitem__(self, key: str) -> object:
            return {"array": np.stack([np.sin(np.arange(1600) / 3.0)] * 2), "sampling_rate": 16000}[key]

    decoded = from_records([{"audio": Decoder(), "label": "a"}], "hf:x", 0, False, "label", "text")
    assert np.allclose(decoded.waves[0], np.sin(np.arange(1600) / 3.0), atol=1e-6)  # two channels averaged

    def undecodable() -> Iterator[dict]:
        raise ImportError("To support decoding audio data, please install 'torchcodec'.")
        yield {}

    with pytest.raises(UserError, match=r"hf:x: decoding its audio needs: pip install datasets\[audio\]"):
        from_records(undecodable(), "hf:x", 0, False, "label", "text")
    with pytest.raises(UserError, match="unknown split 'dev'"):
        load_speech(str(folder), "dev")


def test_a_speech_encoder_loads_with_its_sites_and_frame_activations(
    tiny_speech: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("interlayer.activations.AUDIO_CLIPS", 40)
    lm = load_model(str(tiny_speech))
    assert lm.is_speech and lm.feature_extractor.sampling_rate == SAMPLE_RATE
    with pytest.raises(UserError, match="is a speech encoder .* takes audio, not text"):
        _ = lm.tokenizer
    sites = model_sites(lm.model)
    assert (
        sites["layers.2"].module_path == "encoder.layers.2"
    )  # not the 3 convolutions of the feature encoder
    assert sites["layers.0.mlp"].module_path == "encoder.layers.0.feed_forward"
    batch = next(audio_batches(lm, "synth:digits", "validation", 0, 4))
    speech = load_speech("synth:digits", "validation", 40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:4].tolist()
    lengths = [len(speech.waves[i]) // 320 for i in order]  # 320 samples per frame (about: kernel overhang)
    kept = batch.keep_BT.sum(-1).tolist()
    assert all(abs(a - b) <= 1 for a, b in zip(kept, lengths, strict=True)), (kept, lengths)
    assert batch.inputs["input_values"].shape[0] == 4 and batch.keep_BT.shape[1] == max(kept)


def test_an_sae_trains_on_a_speech_encoders_frames(
    tiny_speech: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_cli import run_cli

    from interlayer.sae.io import load_sae

    monkeypatch.setattr("interlayer.activations.AUDIO_CLIPS", 40)
    code, out, err = run_cli(
        ["sae", "train", "--model", str(tiny_speech), "--data", "synth:digits", "--sites", "layers.1",
         "--latents", "64", "--k", "4", "--tokens", "1024", "--batch-size", "128", "--model-batch-size", "8",
         "--chunk-batches", "2", "--out", str(tmp_path / "sae"), "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    sae = load_sae(tmp_path / "sae" / "layers.1")
    assert sae.cfg.d_in == 32 and summary["sites"]["layers.1"]["steps"] == 8  # 1024 frames / 128 per step


def test_a_pretraining_checkpoint_opens_as_its_encoder_without_a_load_report(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import transformers as T
    from conftest import tiny_speech_config

    torch.manual_seed(0)
    pretraining = T.Wav2Vec2ForPreTraining(tiny_speech_config())
    pretraining.save_pretrained(tmp_path)
    T.Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(tmp_path)
    capfd.readouterr()
    lm = load_model(str(tmp_path))
    err = capfd.readouterr().err
    assert type(lm.model).__name__ == "Wav2Vec2Model" and "LOAD REPORT" not in err and "sharded" not in err
    assert torch.equal(lm.model.encoder.layers[1].feed_forward.output_dense.weight,
                       pretraining.wav2vec2.encoder.layers[1].feed_forward.output_dense.weight)  # fmt: skip
