"""Spoken words from eSpeak NG, for demo corpora and downstream tasks made on the spot.

The synthesizer is the eSpeak NG shared library with its voice data, as shipped by the
``espeakng-loader`` wheel (the ``demo`` extra: ``pip install -e ".[demo]"``); it is called
through ctypes, so nothing is downloaded at run time and no system package is needed.
eSpeak NG is GPL-3.0 software loaded as an optional library; mwmae runs without it.
Its output varies slightly between calls in one process (a few milliseconds of timing and
phase, even after a re-initialisation), so the same text and voice give the same sound, not the
same samples: corpora and tasks made with it are reproducible up to that.

    from mwmae import speech
    wave = speech.say("seven", speech.Voice("en-us+f3", rate=160, pitch=60))  # 16 kHz float32
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading

import numpy as np
from scipy.signal import resample_poly

from mwmae.audio import SAMPLE_RATE

# Accents and voice variants of the English voice data: combined they give ~100 speakers.
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt",
            "croak")

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 3, 4, 7
_POS_CHARACTER = 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class SpeechUnavailable(RuntimeError):
    """The eSpeak NG library is not installed (the ``demo`` extra)."""


@dataclasses.dataclass(frozen=True)
class Voice:
    """One speaker: ``name`` is an eSpeak voice, optionally with a variant (``"en-us+f3"``);
    rate in words per minute, pitch and pitch range 0-100."""

    name: str = "en"
    rate: int = 170
    pitch: int = 50
    pitch_range: int = 50


class _Engine:
    """The process-wide eSpeak NG instance (the library keeps global state)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:
            raise SpeechUnavailable(
                "spoken words need eSpeak NG: pip install -e \".[demo]\" (espeakng-loader)") from e
        self.lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path().encode()
        self.rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if self.rate <= 0:
            raise SpeechUnavailable(f"eSpeak NG failed to initialise with data at {data!r}")
        self.chunks: list[np.ndarray] = []
        self.callback = _CALLBACK(self._collect)  # kept alive: the library holds the pointer
        self.lib.espeak_SetSynthCallback(self.callback)
        self.lock = threading.Lock()

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synthesize(self, text: str, voice: Voice) -> np.ndarray:
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                raise ValueError(f"unknown eSpeak voice {voice.name!r}")
            for param, value in ((_PARAM_RATE, voice.rate), (_PARAM_PITCH, voice.pitch),
                                 (_PARAM_RANGE, voice.pitch_range), (_PARAM_WORDGAP, 0)):
                self.lib.espeak_SetParameter(param, int(value), 0)
            self.chunks = []
            data = text.encode()
            status = self.lib.espeak_Synth(ctypes.c_char_p(data), len(data) + 1, 0,
                                           _POS_CHARACTER, 0, 0, None, None)
            self.lib.espeak_Synchronize()
            if status != 0:
                raise RuntimeError(f"eSpeak NG failed on {text!r} (status {status})")
            pcm = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return pcm.astype(np.float32) / 32768.0


_engine: _Engine | None = None


def available() -> bool:
    """Whether the synthesizer can be loaded here."""
    try:
        _get_engine()
    except SpeechUnavailable:
        return False
    return True


def _get_engine() -> _Engine:
    global _engine
    if _engine is None:
        _engine = _Engine()
    return _engine


def say(text: str, voice: Voice = Voice()) -> np.ndarray:
    """``text`` spoken by ``voice``: float32 mono at 16 kHz, leading/trailing silence trimmed."""
    engine = _get_engine()
    wave = engine.synthesize(text, voice)
    loud = np.flatnonzero(np.abs(wave) > 1e-3)
    if loud.size == 0:
        raise RuntimeError(f"eSpeak NG produced silence for {text!r} with voice {voice}")
    wave = wave[loud[0]:loud[-1] + 1]
    g = np.gcd(SAMPLE_RATE, engine.rate)
    return resample_poly(wave, SAMPLE_RATE // g, engine.rate // g).astype(np.float32)


def random_voice(rng: np.random.Generator, accents: tuple[str, ...] = ACCENTS,
                 variants: tuple[str, ...] = VARIANTS) -> Voice:
    """A speaker drawn from accent x variant x speaking rate x pitch."""
    accent = accents[int(rng.integers(len(accents)))]
    name = f"{accent}+{variants[int(rng.integers(len(variants)))]}"
    return Voice(name, rate=int(rng.integers(120, 230)), pitch=int(rng.integers(20, 80)),
                 pitch_range=int(rng.integers(20, 90)))
