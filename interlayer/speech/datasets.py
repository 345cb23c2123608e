"""Speech data by the name a user types (``--data``), one split at a time, as a :class:`SpeechSet`.

- ``synth:digits`` / ``synth:styles``: the embedded eSpeak NG sets (:mod:`interlayer.speech.corpus`), with
  ``sizes[split]`` clips per split.
- a local folder: ``metadata.jsonl``, one JSON object per clip: ``file_name`` (a path relative to the folder, as
  in Hugging Face's audiofolder), ``label`` (classification) and/or ``text`` (a transcript), and ``split``
  (``train`` | ``validation`` | ``test``; a record without one is ``train``).
- ``hf:ID`` or ``hf:ID:CONFIG``: a Hugging Face dataset through ``datasets`` (needs its audio decoding extra:
  ``pip install datasets[audio]``), with its ``audio`` column and a label column (``label``) or a transcript
  column (``text``), renamed with ``--label-column`` / ``--text-column``. LibriSpeech:
  ``hf:openslr/librispeech_asr:clean`` (splits ``train.100``, ``validation``, ``test``: pass them with
  ``--splits``). RAVDESS: any hub copy with an audio and an emotion column.

Clips are checked and brought to 16 kHz by :func:`interlayer.audio.prepare_clip` (another rate is refused
unless ``resample``).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from interlayer.audio import prepare_clip, read_audio
from interlayer.errors import UserError
from interlayer.speech.corpus import SETS, SpeechSet, embedded_set
from interlayer.speech.synthesis import SAMPLE_RATE

SPLITS = ("train", "validation", "test")


def load_speech(
    spec: str,
    split: str,
    size: int = 0,
    seed: int = 0,
    resample: bool = False,
    label_column: str = "label",
    text_column: str = "text",
    split_name: str | None = None,
) -> SpeechSet:
    """The ``split`` clips of ``spec`` (see the module docstring); ``size`` > 0 caps them (the first ``size``)
    and is the size of a synthesised split; ``split_name`` is the dataset's own name for the split."""
    if not spec.startswith("hf:") and split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if spec.startswith("synth:"):
        name = spec.removeprefix("synth:")
        if name not in SETS:
            raise UserError(f"unknown synthesised set {spec!r}; choose synth:{' or synth:'.join(SETS)}")
        if size < 1:
            raise UserError(f"{spec}: give the number of {split} clips to synthesise (at least 1)")
        return embedded_set(name, split, size, seed)
    if spec.startswith("hf:"):
        return _hub_set(spec, split_name or split, size, resample, label_column, text_column)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"speech data {spec!r} not found: give synth:digits, synth:styles, a folder with metadata.jsonl, "
            "or hf:DATASET_ID"
        )
    return _folder_set(folder, split, size, resample)


def _folder_set(folder: Path, split: str, size: int, resample: bool) -> SpeechSet:
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise UserError(f"{folder}: no metadata.jsonl (one JSON object per clip: file_name, label or text)")
    waves, texts, labels = [], [], []
    for number, line in enumerate(metadata.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"{metadata}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or "file_name" not in record:
            raise UserError(f"{metadata}:{number}: needs a file_name field")
        if record.get("split", "train") != split:
            continue
        waves.append(read_audio(folder / str(record["file_name"]), SAMPLE_RATE, resample))
        texts.append(str(record.get("text", "")))
        if "label" in record:
            labels.append(str(record["label"]))
        elif labels:
            raise UserError(f"{metadata}:{number}: no label, but earlier clips of split {split} have one")
        if size and len(waves) == size:
            break
    if labels and len(labels) != len(waves):
        raise UserError(f"{metadata}: some clips of split {split} have a label and some do not")
    return SpeechSet(str(folder), waves, texts, labels)


def from_records(
    records: Any, name: str, size: int, resample: bool, label_column: str, text_column: str
) -> SpeechSet:
    """A :class:`SpeechSet` from rows with an ``audio`` dict (``array``, ``sampling_rate``: what ``datasets``'
    Audio feature decodes to) and a label or transcript column (class labels given as integers are kept as
    their text)."""
    waves, texts, labels = [], [], []
    rows = iter(records)
    for index in itertools.count():
        if size and index == size:
            break
        try:
            row = next(rows)
        except StopIteration:
            break
        except ImportError as error:  # datasets ≥ 4 decodes audio with torchcodec, an optional extra
            raise UserError(
                f"{name}: decoding its audio needs: pip install datasets[audio] ({error})"
            ) from None
        audio = row.get("audio")
        try:  # a dict (datasets < 4, plain rows) or torchcodec's AudioDecoder (datasets ≥ 4): both index so
            array, rate = audio["array"], audio["sampling_rate"]
        except (TypeError, KeyError, IndexError):
            raise UserError(
                f"{name}: row {index} has no decoded audio column (array, sampling_rate)"
            ) from None
        samples = np.asarray(array, dtype=np.float32)
        if samples.ndim == 2:  # channels first (torchcodec) or last: averaged to mono
            samples = samples.mean(axis=int(np.argmin(samples.shape)))
        waves.append(prepare_clip(samples, int(rate), SAMPLE_RATE, f"{name} row {index}", resample))
        texts.append(str(row.get(text_column, "")))
        if label_column in row:
            labels.append(str(row[label_column]))
    if not waves:
        raise UserError(f"{name}: no clips")
    return SpeechSet(name, waves, texts, labels)


def _hub_set(
    spec: str, split: str, size: int, resample: bool, label_column: str, text_column: str
) -> SpeechSet:
    import datasets

    dataset_id, _, config = spec.removeprefix("hf:").partition(":")
    try:
        dataset = datasets.load_dataset(dataset_id, config or None, split=split, streaming=bool(size))
    except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
        raise UserError(f"{spec}: could not load split {split!r} ({type(exc).__name__}: {exc})") from None
    return from_records(dataset, spec, size, resample, label_column, text_column)
