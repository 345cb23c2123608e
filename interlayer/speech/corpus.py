"""The embedded speech sets, synthesised with eSpeak NG (:mod:`interlayer.speech.synthesis`), seeded and cached.

- ``synth:digits`` (CTC transcription): 2–5 digits spoken as English words ("three one four"), transcribed as
  the digits separated by spaces ("3 1 4"): a character-level CTC task whose words are digits, so WER is the
  digit error rate.
- ``synth:styles`` (classification, a stand-in for emotion): one word of :data:`WORDS` spoken in one of four
  speaking styles, :data:`STYLES`, each a region of (rate, pitch, pitch range, volume) that neighbouring
  styles overlap at the edges, on top of a random speaker.

Every clip is spoken by one of :data:`SPEAKERS` (eSpeak voice variants, male and female), drawn per clip.
Clip i of a split depends only on (seed, split, i): its random draws come from a generator seeded with
``row_seed(seed, offset + i)``, the splits taking disjoint index ranges (train from 0, validation from 10⁶, test
from 2·10⁶), so a larger set starts with the smaller one's clips. A set is synthesised once into
``~/.cache/interlayer/speech/<set>-<split>-<seed>-<n>.safetensors`` (every clip's int16 samples concatenated,
with the offsets) and a JSON twin with the texts and labels, both written atomically.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from interlayer import atomic
from interlayer.errors import UserError
from interlayer.speech.synthesis import SAMPLE_RATE, Voice, synthesize
from interlayer.training import row_seed

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "wait", "open", "close", "water",
    "morning", "evening", "paper", "window", "garden", "orange", "yellow", "music", "table", "river",
)  # fmt: skip
SPEAKERS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
STYLES: dict[str, dict[str, tuple[int, int]]] = {
    "calm": {"rate": (130, 165), "pitch": (35, 55), "range": (15, 40), "volume": (80, 110)},
    "excited": {"rate": (175, 215), "pitch": (60, 85), "range": (65, 100), "volume": (110, 150)},
    "sad": {"rate": (95, 135), "pitch": (15, 40), "range": (0, 20), "volume": (60, 95)},
    "angry": {"rate": (165, 205), "pitch": (35, 60), "range": (35, 70), "volume": (140, 190)},
}
"""Each style's ranges, drawn uniformly per clip (inclusive)."""
SETS = ("digits", "styles")
SPLITS = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
VERSION = 1


@dataclass
class SpeechSet:
    """Clips at :data:`SAMPLE_RATE` with their transcripts and, for a classification set, labels."""

    name: str
    """Where the clips came from (``synth:digits``, a folder, a dataset id)."""
    waves: list[np.ndarray]
    """float32 samples in [-1, 1] per clip."""
    texts: list[str]
    """The transcript of each clip (what CTC learns)."""
    labels: list[str] = field(default_factory=list)
    """The class of each clip (empty for a transcription-only set)."""

    def __len__(self) -> int:
        return len(self.waves)

    def seconds(self) -> float:
        """Total audio duration."""
        return sum(len(w) for w in self.waves) / SAMPLE_RATE


def _draw(name: str, generator: np.random.Generator) -> tuple[str, str, str, Voice]:
    speaker = SPEAKERS[generator.integers(len(SPEAKERS))]
    if name == "digits":
        digits = generator.integers(10, size=generator.integers(2, 6))
        spoken = " ".join(DIGIT_WORDS[d] for d in digits)
        voice = Voice(
            speaker,
            int(generator.integers(120, 201)),
            int(generator.integers(25, 76)),
            int(generator.integers(20, 81)),
        )
        return spoken, " ".join(str(d) for d in digits), "", voice
    style = list(STYLES)[generator.integers(len(STYLES))]
    values = {key: int(generator.integers(low, high + 1)) for key, (low, high) in STYLES[style].items()}
    word = WORDS[generator.integers(len(WORDS))]
    return word, word, style, Voice(speaker, **values)


def synthesize_set(name: str, split: str, size: int, seed: int = 0) -> SpeechSet:
    """``size`` clips of the embedded set ``name`` (``digits`` | ``styles``) for ``split``, synthesised now in
    this process (whose earlier utterances change the samples slightly: :func:`embedded_set` uses a fresh one)."""
    if name not in SETS:
        raise UserError(f"unknown synthesised set {name!r}; choose synth:{' or synth:'.join(SETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    waves, texts, labels = [], [], []
    for index in range(size):
        generator = np.random.default_rng(row_seed(seed, SPLITS[split] + index))
        spoken, text, label, voice = _draw(name, generator)
        waves.append(synthesize(spoken, voice))
        texts.append(text)
        labels.append(label)
    return SpeechSet(f"synth:{name}", waves, texts, labels if name == "styles" else [])


def cache_root() -> Path:
    """``$INTERLAYER_CACHE/speech`` or ``~/.cache/interlayer/speech``."""
    from interlayer.zoo import cache_root as interlayer_cache

    return interlayer_cache() / "speech"


def _cache_stem(name: str, split: str, size: int, seed: int) -> Path:
    return cache_root() / f"{name}-{split}-{seed}-{size}-v{VERSION}"


def write_cached_set(name: str, split: str, size: int, seed: int) -> None:
    """Synthesise the set in this process and write it to the cache (what the fresh process runs)."""
    speech = synthesize_set(name, split, size, seed)
    stem = _cache_stem(name, split, size, seed)
    pcm = [np.round(w * 32767.0).astype(np.int16) for w in speech.waves]
    offsets = np.cumsum([0] + [len(p) for p in pcm])
    atomic.write_tensors(
        stem.with_suffix(".safetensors"),
        {"samples": torch.from_numpy(np.concatenate(pcm)), "offsets": torch.from_numpy(offsets)},
    )
    atomic.write_json(
        stem.with_suffix(".json"), {"texts": speech.texts, "labels": speech.labels, "version": VERSION}
    )


def embedded_set(name: str, split: str, size: int, seed: int = 0) -> SpeechSet:
    """The embedded set ``name`` (``digits`` | ``styles``): ``size`` clips of ``split``, read from the cache,
    where a fresh process synthesises it first when it is missing."""
    if name not in SETS:
        raise UserError(f"unknown synthesised set {name!r}; choose synth:{' or synth:'.join(SETS)}")
    if split not in SPLITS or size < 1:
        raise UserError(f"a synthesised set needs a split of {', '.join(SPLITS)} and a size ≥ 1")
    stem = _cache_stem(name, split, size, seed)
    tensors_path, meta_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not (tensors_path.is_file() and meta_path.is_file()):
        command = [sys.executable, "-m", "interlayer.speech.corpus", name, split, str(size), str(seed)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise UserError(f"synthesising synth:{name} ({split}) failed: {lines[-1]}")
    tensors = atomic.read_tensors(tensors_path, "speech cache")
    meta = atomic.read_json_object(meta_path, "speech cache")
    samples, offsets = tensors["samples"].numpy(), tensors["offsets"].tolist()
    waves = [samples[a:b].astype(np.float32) / 32767.0 for a, b in zip(offsets, offsets[1:], strict=False)]
    return SpeechSet(f"synth:{name}", waves, list(meta["texts"]), list(meta["labels"]))


if __name__ == "__main__":  # python -m interlayer.speech.corpus NAME SPLIT SIZE SEED: fill the cache
    try:
        write_cached_set(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    except UserError as error:
        sys.exit(f"error: {error}")
