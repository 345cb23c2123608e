"""Audio input for speech encoders: reading clips, their checks, and batches for a feature extractor.

Every clip reaches a model as mono float32 at the model's rate (16 kHz for the wav2vec2 family). A file at another
rate is refused with one line naming the file and both rates, unless the caller asks to resample (``--resample``:
``scipy.signal.resample_poly`` with the reduced ratio of the two rates). Multi-channel audio is averaged to
mono. A file with no samples, or whose peak amplitude is below :data:`SILENCE_PEAK` (−80 dBFS), is refused:
features of silence are the bias terms alone and mean nothing. WAV is read with ``scipy.io.wavfile`` (PCM 8/16/
32-bit and float); FLAC, MP3 and OGG need the optional ``soundfile`` package.
"""

from __future__ import annotations

import inspect
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interlayer.errors import UserError

SILENCE_PEAK = 1e-4
"""A clip whose largest |sample| is below this (−80 dBFS) is silent."""
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``wave`` from ``rate`` to ``target`` Hz (polyphase filtering; unchanged when the rates agree)."""
    if rate == target:
        return wave.astype(np.float32)
    from scipy.signal import resample_poly

    divisor = gcd(rate, target)
    return resample_poly(wave.astype(np.float64), target // divisor, rate // divisor).astype(np.float32)


def check_clip(wave: np.ndarray, where: str) -> np.ndarray:
    """``wave`` as float32, or a :class:`UserError` when it is empty, silent or not finite."""
    if wave.size == 0:
        raise UserError(f"{where}: the audio is empty (no samples)")
    if not np.isfinite(wave).all():
        raise UserError(f"{where}: the audio holds NaN or infinite samples")
    if float(np.abs(wave).max()) < SILENCE_PEAK:
        raise UserError(f"{where}: the audio is silent (peak below {SILENCE_PEAK:g}, −80 dBFS)")
    return wave.astype(np.float32)


def prepare_clip(
    wave: np.ndarray, rate: int, target: int, where: str, resample_to_target: bool
) -> np.ndarray:
    """A clip checked (:func:`check_clip`) and at ``target`` Hz: resampled when allowed, else refused."""
    if rate != target and not resample_to_target:
        raise UserError(
            f"{where}: the audio is at {rate} Hz, the model takes {target} Hz; "
            "pass --resample to resample it, or convert the file"
        )
    return check_clip(resample(wave, rate, target), where)


def _pcm_to_float(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    return data.astype(np.float32)


def read_audio(path: str | Path, target: int = 16_000, resample_to_target: bool = False) -> np.ndarray:
    """The mono float32 samples of the file at ``path`` at ``target`` Hz (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"audio file not found: {path}")
    if path.suffix.lower() == ".wav":
        from scipy.io import wavfile

        try:
            rate, data = wavfile.read(path)
        except (ValueError, EOFError) as exc:
            raise UserError(f"{path}: not a readable WAV file ({exc})") from None
        samples = _pcm_to_float(np.asarray(data))
    elif path.suffix.lower() in AUDIO_SUFFIXES:
        try:
            import soundfile
        except ModuleNotFoundError:
            raise UserError(
                f"{path}: reading {path.suffix} needs the soundfile package (pip install soundfile), "
                "or convert it to WAV"
            ) from None
        samples, rate = soundfile.read(path, dtype="float32")
    else:
        raise UserError(f"{path}: not an audio file; use one of {', '.join(AUDIO_SUFFIXES)}")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    return prepare_clip(samples, int(rate), target, str(path), resample_to_target)


def frame_lengths(encoder: Any, sample_lengths: torch.Tensor) -> torch.Tensor:
    """The number of encoder frames of clips of ``sample_lengths`` samples (the convolutional feature
    encoder's output lengths; a model's optional adapter, applied after the hidden states, left out)."""
    lengths = encoder._get_feat_extract_output_lengths
    if "add_adapter" in inspect.signature(lengths).parameters:
        return lengths(sample_lengths, add_adapter=False)
    return lengths(sample_lengths)


def feature_batch(feature_extractor: Any, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_values`` [batch, samples] and the sample mask [batch, samples] for ``waves`` (each clip normalised
    as the model's feature extractor does, then right-padded with zeros)."""
    features = feature_extractor(
        waves,
        sampling_rate=feature_extractor.sampling_rate,
        padding=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return features["input_values"], features["attention_mask"]
