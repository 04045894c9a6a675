"""A small unlabelled audio corpus made on the spot: spoken words and structured sounds.

    python -m mwmae.demo.corpus OUT_DIR [--clips 1200] [--duration 2.5] [--speech-fraction 0.6]

Writes ``OUT_DIR/{speech,tones,noise}/*.wav`` (16 kHz mono, 16-bit), the layout
``python -m tfrecord_tools.build --source folder`` reads. Speech is eSpeak NG (the ``demo`` extra)
saying one to three words of a vocabulary that leaves out the digit words (the demo's downstream
task), by ~100 speakers at random rates and pitches; without eSpeak NG the corpus is all
structured sounds. Tones are melodies of harmonic notes, glides and chords; noise is coloured
noise with clicks and bursts. Every clip has random level and background noise. Files that
already exist are kept, so a rerun only adds what is missing.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import soundfile as sf

from mwmae import cli, speech
from mwmae.hear.tasks import (
    SAMPLE_RATE,
    _coloured_noise,
    _envelope,
    _finish,
    _harmonic,
    spoken_clip,
)

VOCABULARY = (
    "yes no up down left right on off stop go house tree bird cat dog bed happy wow marvin "
    "sheila forward backward follow learn visual music water paper window table orange green "
    "yellow purple morning evening river mountain garden kitchen station computer telephone "
    "number letter picture season weather summer winter"
).split()


def _speech(rng: np.random.Generator, n: int) -> np.ndarray:
    words = " ".join(rng.choice(VOCABULARY, size=int(rng.integers(1, 4))))
    return spoken_clip(words, rng, n, noise=(0.01, 0.2))


def _tones(rng: np.random.Generator, n: int) -> np.ndarray:
    style = rng.integers(3)
    x = np.zeros(n)
    if style == 0:  # a melody: harmonic notes on a scale
        pos = 0
        while pos < n:
            length = int(rng.uniform(0.1, 0.5) * SAMPLE_RATE)
            f0 = 110.0 * 2 ** (int(rng.integers(0, 36)) / 12)
            seg = _harmonic(rng, f0, min(length, n - pos), int(rng.integers(1, 8)))
            x[pos:pos + len(seg)] = seg * _envelope(rng, len(seg))
            pos += length
    elif style == 1:  # a glide
        t = np.arange(n) / SAMPLE_RATE
        f = 150.0 * 2 ** (rng.uniform(0, 3) + rng.uniform(-2, 2) * t / t[-1])
        phase = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
        x = sum(np.sin(h * phase) / h for h in range(1, int(rng.integers(2, 6))))
    else:  # chords
        root = 110.0 * 2 ** rng.uniform(0, 2)
        steps = ((0, 4, 7), (0, 3, 7), (0, 3, 6), (0, 4, 8))[int(rng.integers(4))]
        x = sum(_harmonic(rng, root * 2 ** (s / 12), n, 4) for s in steps) * _envelope(rng, n)
    return _finish(rng, np.asarray(x))


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    x = _coloured_noise(rng, n, rng.uniform(-2, 1)) * rng.uniform(0.05, 0.5)
    for _ in range(int(rng.integers(1, 8))):  # clicks and bursts
        start = int(rng.integers(0, n - 1))
        length = min(int(rng.uniform(0.002, 0.2) * SAMPLE_RATE), n - start)
        x[start:start + length] += (_coloured_noise(rng, length, rng.uniform(-1, 1))
                                    * np.hanning(length))
    return _finish(rng, x, noise_level=0.0)


def make_corpus(out: str | pathlib.Path, clips: int = 1200, duration_s: float = 2.5,
                speech_fraction: float = 0.6, seed: int = 0, progress: bool = False
                ) -> dict[str, int]:
    """Write the corpus; returns clips per kind. Clip i is drawn from (seed, i), the same on
    every run (speech up to eSpeak NG's small call-to-call variation), and existing files are
    not rewritten."""
    out = pathlib.Path(out)
    if not speech.available():
        print("eSpeak NG not installed (pip install -e '.[demo]'): no speech in the corpus",
              file=sys.stderr)
        speech_fraction = 0.0
    n = int(round(duration_s * SAMPLE_RATE))
    n_speech = int(round(clips * speech_fraction))
    n_tones = (clips - n_speech) // 2
    plan = ([("speech", _speech)] * n_speech + [("tones", _tones)] * n_tones
            + [("noise", _noise)] * (clips - n_speech - n_tones))
    items = enumerate(plan)
    if progress:
        from tqdm import tqdm
        items = tqdm(items, total=clips, desc="corpus", unit="clip")
    counts: dict[str, int] = {}
    for i, (kind, make) in items:
        path = out / kind / f"{kind}_{i:05d}.wav"
        counts[kind] = counts.get(kind, 0) + 1
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        x = make(np.random.default_rng([seed, i]), n)
        tmp = path.with_suffix(".tmp.wav")
        sf.write(tmp, x, SAMPLE_RATE, subtype="PCM_16")
        tmp.rename(path)  # a killed run never leaves a half-written clip under the real name
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.demo.corpus", description=__doc__.split(
        "\n")[0])
    p.add_argument("out")
    p.add_argument("--clips", type=int, default=1200)
    p.add_argument("--duration", type=float, default=2.5, help="seconds per clip")
    p.add_argument("--speech-fraction", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    a = cli.parse_args(p, argv)
    counts = make_corpus(a.out, a.clips, a.duration, a.speech_fraction, a.seed, progress=True)
    print(f"corpus in {a.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
