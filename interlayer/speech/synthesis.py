"""Offline speech from eSpeak NG: text → 16 kHz float32 waveform, voice, rate and pitch chosen per utterance.

The library and its data ship in the PyPI package ``espeakng-loader`` (``libespeak-ng.so`` + ``espeak-ng-data``;
Debian's ``libespeak-ng1`` works too: set ``$INTERLAYER_ESPEAK_LIBRARY`` and ``$INTERLAYER_ESPEAK_DATA``). It
is driven through ctypes because no maintained Python binding retrieves the samples without a sound device
(``py-espeak-ng`` shells out to the ``espeak-ng`` program, which this machine lacks). eSpeak synthesises at
22,050 Hz; the samples are resampled to 16 kHz with a polyphase filter (``scipy.signal.resample_poly``, up
320 / down 441) and scaled to [-1, 1]. eSpeak keeps state from one utterance to the next (its pitch flutter
runs on; reinitialising does not reset it), so an utterance's samples depend on what the process spoke before
(lengths differ by about a millisecond): the same sequence of utterances in a fresh process gives the same
samples. :mod:`interlayer.speech.corpus` therefore synthesises every set in a fresh process.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

from interlayer.errors import UserError

SAMPLE_RATE = 16_000
"""The rate every interlayer speech clip has (the wav2vec2 family's)."""
_AUDIO_OUTPUT_SYNCHRONOUS = (
    2  # espeak_AUDIO_OUTPUT: espeak_Synth returns once every sample went to the callback
)
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAMETERS = {"rate": 1, "volume": 2, "pitch": 3, "range": 4}  # espeak_PARAMETER
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Voice:
    """How one utterance is spoken."""

    variant: str = "m1"
    """An eSpeak voice variant (``m1``–``m7``, ``f1``–``f4``, ``klatt``, ...), put on the English voice."""
    rate: int = 160
    """Words per minute (80–450)."""
    pitch: int = 50
    """Base pitch, 0–100."""
    range: int = 50
    """Pitch range (intonation), 0–100."""
    volume: int = 100
    """Amplitude, 0–200."""


class _Engine:
    """The process's one eSpeak instance (the C library keeps global state), serialised by a lock."""

    def __init__(self) -> None:
        library, data = _library_paths()
        self.lib = ctypes.CDLL(library)
        self.lib.espeak_Initialize.restype = ctypes.c_int
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
        if rate <= 0:
            raise UserError(f"eSpeak NG could not start with its data at {data}")
        self.native_rate = int(rate)
        self.samples: list[np.ndarray] = []
        self.callback = _CALLBACK(self._receive)  # kept referenced: eSpeak calls it after this returns
        self.lib.espeak_SetSynthCallback(self.callback)
        self.lock = threading.Lock()

    def _receive(self, wav: ctypes._Pointer, count: int, _events: int) -> int:
        if count > 0:
            self.samples.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        with self.lock:
            if self.lib.espeak_SetVoiceByName(f"en+{voice.variant}".encode()) != 0:
                raise UserError(f"eSpeak NG has no voice variant {voice.variant!r}")
            for name, value in (
                ("rate", voice.rate),
                ("pitch", voice.pitch),
                ("range", voice.range),
                ("volume", voice.volume),
            ):
                self.lib.espeak_SetParameter(_PARAMETERS[name], int(value), 0)
            self.samples = []
            encoded = text.encode()
            status = self.lib.espeak_Synth(
                encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
            if status != 0:
                raise RuntimeError(f"espeak_Synth failed with status {status} on {text!r}")
            self.lib.espeak_Synchronize()
            pcm = np.concatenate(self.samples) if self.samples else np.zeros(0, np.int16)
        return pcm


def _library_paths() -> tuple[str, str]:
    library, data = os.environ.get("INTERLAYER_ESPEAK_LIBRARY"), os.environ.get("INTERLAYER_ESPEAK_DATA")
    if library and data:
        return library, data
    try:
        import espeakng_loader
    except ModuleNotFoundError:
        raise UserError(
            "speech synthesis needs eSpeak NG: pip install espeakng-loader "
            "(or set INTERLAYER_ESPEAK_LIBRARY and INTERLAYER_ESPEAK_DATA to a system libespeak-ng)"
        ) from None
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


_engine: _Engine | None = None


def synthesize(text: str, voice: Voice = Voice()) -> np.ndarray:
    """``text`` spoken by ``voice``: float32 samples in [-1, 1] at :data:`SAMPLE_RATE`."""
    global _engine
    if _engine is None:
        _engine = _Engine()
    pcm = _engine.speak(text, voice)
    resampled = resample_poly(pcm.astype(np.float64) / 32768.0, SAMPLE_RATE, _engine.native_rate)
    return np.clip(resampled, -1.0, 1.0).astype(np.float32)
