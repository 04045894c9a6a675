"""Small HEAR-format tasks synthesised with numpy, for end-to-end tests and the demo.

    python -m mwmae.hear.tasks OUT_DIR [--kind chords] [--per-class 24] [--duration 2.0]

Each task is a folder that hear-eval-kit reads (``--tasks-dir`` is its parent):

    TASK/task_metadata.json      task_name, embedding_type, prediction_type, split_mode, ...
    TASK/labelvocabulary.csv     idx,label
    TASK/{train,valid,test}.json {"file.wav": [labels]} (scene) or [{label, start, end}] (event)
    TASK/16000/{split}/*.wav     16 kHz mono, 16-bit PCM

Kinds (scene, multiclass, top-1 accuracy unless noted):

* ``pitch``  - harmonic tones whose fundamental lies in one of four octave bands;
* ``noise``  - white, pink, brown and blue noise;
* ``chords`` - major vs minor vs diminished vs augmented triads on random roots (the root
  varies across an octave, so no single frequency tells the class: the intervals do);
* ``order``  - a low and a high tone one after the other, "rising" or "falling": both classes
  have the same average spectrum, only the temporal order differs (a mean over time of
  context-free frame features cannot tell them apart; features that see context can);
* ``events`` - event detection: 1-3 tone bursts of two kinds ("low", "high") in noise,
  labelled with onset and offset in ms (multilabel, event-based onset F-measure);
* ``digits`` - spoken digits "zero" to "nine" (needs eSpeak NG: the ``demo`` extra), each at a
  random time in noise; the speakers of the valid and test splits (voice variants) never occur
  in train, so the task measures what generalises across speakers, like Speech Commands.
* ``notes`` - the pitch of an instrument's note, NSynth-Pitch-like: the 12 semitones C4..B4
  (261.6-493.9 Hz, each detuned by up to 20 cents) played by synthetic instruments whose
  timbres differ between the splits (train: organ, bowed string, plucked string; valid: FM;
  test: reed, sung vowel), so only the pitch, not the timbre, carries over.

Every clip has random level, timbre and background noise; a seed makes the task reproducible.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import shutil
import sys
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import soundfile as sf

from mwmae import cli
from mwmae.audio import SAMPLE_RATE

SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)

SCENE_KINDS = {
    "pitch": ("band_1", "band_2", "band_3", "band_4"),
    "noise": ("white", "pink", "brown", "blue"),
    "chords": ("major", "minor", "diminished", "augmented"),
    "order": ("rising", "falling"),
    "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "notes": ("C4", "C#4", "D4", "D#4", "E4", "F4", "F#4", "G4", "G#4", "A4", "A#4", "B4"),
}
# Which synthetic instruments play in which split of the ``notes`` task (disjoint timbres).
_SPLIT_TIMBRES = {"train": ("organ", "string", "pluck"), "valid": ("fm",),
                  "test": ("reed", "voice")}
# Which eSpeak voice variants speak in which split of the ``digits`` task (disjoint speakers).
_SPLIT_VARIANTS = {"train": ("m1", "m2", "m3", "m4", "f1", "f2", "klatt"),
                   "valid": ("m5", "f3", "croak"), "test": ("m6", "m7", "f4", "f5")}
EVENT_LABELS = ("low", "high")
KINDS = (*SCENE_KINDS, "events")
SMALL_TASK_GRID = {"batch_size": [32], "max_epochs": [60], "patience": [10],
                   "check_val_every_n_epoch": [2], "lr": [1e-3], "hidden_layers": [1],
                   "hidden_dim": [128]}
_CHORD_STEPS = {"major": (0, 4, 7), "minor": (0, 3, 7), "diminished": (0, 3, 6),
                "augmented": (0, 4, 8)}


def _harmonic(rng: np.random.Generator, f0: float, n: int, n_harmonics: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    tilt = rng.uniform(0.5, 1.5)
    out = np.zeros(n)
    for h in range(1, n_harmonics + 1):
        if h * f0 < SAMPLE_RATE / 2 - 500:
            out += np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi)) / h ** tilt
    return out


def _coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power spectral density ~ f ** exponent (0 white, -1 pink, -2 brown, 1 blue)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    f[0] = f[1]
    noise = np.fft.irfft(spec * f ** (exponent / 2), n)
    return noise / (np.abs(noise).max() + 1e-12)


def _envelope(rng: np.random.Generator, n: int) -> np.ndarray:
    attack = min(int(rng.uniform(0.005, 0.05) * SAMPLE_RATE), n)
    env = np.exp(-np.arange(n) / (rng.uniform(0.3, 3.0) * SAMPLE_RATE))
    env[:attack] *= np.linspace(0, 1, attack)
    return env


def _finish(rng: np.random.Generator, x: np.ndarray, noise_level: float = 0.05) -> np.ndarray:
    x = x / (np.abs(x).max() + 1e-12)
    x = x + noise_level * rng.uniform(0.2, 1.0) * _coloured_noise(
        rng, len(x), rng.uniform(-2, 0))
    return (x / (np.abs(x).max() + 1e-12) * rng.uniform(0.1, 0.9)).astype(np.float32)


def spoken_clip(text: str, rng: np.random.Generator, n: int,
                variants: tuple[str, ...] | None = None,
                noise: tuple[float, float] = (0.02, 0.3)) -> np.ndarray:
    """``text`` said by a random eSpeak voice (of ``variants``, default all) at a random time
    in ``n`` samples, over background noise of a level drawn from ``noise``."""
    from mwmae import speech

    voice = speech.random_voice(rng, variants=variants or speech.VARIANTS)
    wave = speech.say(text, voice)[:n]
    x = np.zeros(n)
    start = int(rng.integers(0, n - len(wave) + 1))
    x[start:start + len(wave)] = wave
    return _finish(rng, x, noise_level=rng.uniform(*noise))


def _scene_clip(kind: str, label: str, rng: np.random.Generator, n: int,
                split: str = "train") -> np.ndarray:
    if kind == "pitch":
        band = SCENE_KINDS["pitch"].index(label)
        f0 = 110.0 * 2 ** (band + rng.uniform(0, 1))
        x = _harmonic(rng, f0, n, int(rng.integers(1, 8))) * _envelope(rng, n)
        return _finish(rng, x)
    if kind == "noise":
        exponent = {"white": 0.0, "pink": -1.0, "brown": -2.0, "blue": 1.0}[label]
        return _finish(rng, _coloured_noise(rng, n, exponent), noise_level=0.0)
    if kind == "chords":
        root = 130.8 * 2 ** rng.uniform(0, 1)
        n_harmonics = int(rng.integers(2, 6))
        x = sum(_harmonic(rng, root * 2 ** (s / 12), n, n_harmonics)
                for s in _CHORD_STEPS[label])
        return _finish(rng, x * _envelope(rng, n))
    if kind == "order":
        low = 220.0 * 2 ** rng.uniform(0, 1)
        high = low * 2 ** rng.uniform(1.5, 2.5)
        first, second = (low, high) if label == "rising" else (high, low)
        half = n // 2
        gap = int(rng.uniform(0.0, 0.1) * half)
        x = np.zeros(n)
        for f0, start, length in ((first, 0, half - gap), (second, half, n - half)):
            x[start:start + length] = (_harmonic(rng, f0, length, int(rng.integers(1, 4)))
                                       * np.hanning(length))
        return _finish(rng, x)
    if kind == "digits":
        return spoken_clip(label, rng, n, _SPLIT_VARIANTS[split])
    if kind == "notes":
        semitone = SCENE_KINDS["notes"].index(label)
        f0 = 261.63 * 2 ** ((semitone + rng.uniform(-0.2, 0.2)) / 12)
        timbres = _SPLIT_TIMBRES[split]
        x = _instrument(timbres[int(rng.integers(0, len(timbres)))], rng, f0, n)
        return _finish(rng, x, noise_level=rng.uniform(0.01, 0.1))
    raise ValueError(f"unknown scene task kind {kind!r}; known: {sorted(SCENE_KINDS)}")


def _instrument(timbre: str, rng: np.random.Generator, f0: float, n: int) -> np.ndarray:
    """One note of ``f0`` Hz by a synthetic instrument, within ``n`` samples."""
    t = np.arange(n) / SAMPLE_RATE
    length = int(n * rng.uniform(0.5, 0.9))
    start = int(rng.integers(0, n - length + 1))
    note = np.zeros(n)
    tn = t[:length]
    if timbre == "pluck":  # Karplus-Strong: a noise burst in a damped delay line
        period = max(2, int(round(SAMPLE_RATE / f0)))
        buf = rng.uniform(-1, 1, period)
        out = np.empty(length)
        decay = rng.uniform(0.990, 0.998)
        for i in range(length):
            out[i] = buf[i % period]
            buf[i % period] = decay * 0.5 * (buf[i % period] + buf[(i + 1) % period])
        note[start:start + length] = out
        return note
    if timbre == "fm":  # a harmonic carrier:modulator ratio, the index decaying
        index = rng.uniform(1, 4) * np.exp(-tn * rng.uniform(1, 4))
        wave = np.sin(2 * np.pi * f0 * tn + index * np.sin(2 * np.pi * f0 * tn))
    elif timbre == "voice":  # a glottal pulse train through two vowel formants
        pulses = np.sign(np.sin(2 * np.pi * f0 * tn)) * 0.5 + _harmonic(rng, f0, length, 12)
        spec = np.fft.rfft(pulses)
        freqs = np.fft.rfftfreq(length, 1 / SAMPLE_RATE)
        gain = sum(np.exp(-((freqs - fc) / bw) ** 2)
                   for fc, bw in ((rng.uniform(500, 900), 120), (rng.uniform(1000, 2200), 200)))
        wave = np.fft.irfft(spec * (0.05 + gain), length)
    else:
        weights = {"organ": lambda h: 1.0 if h <= 6 else 0.0,
                   "string": lambda h: 1.0 / h,
                   "reed": lambda h: 1.0 / h if h % 2 else 0.05 / h}[timbre]
        vibrato = 1 + 0.004 * np.sin(2 * np.pi * rng.uniform(4, 6) * tn) * (timbre == "string")
        phase = 2 * np.pi * f0 * np.cumsum(vibrato) / SAMPLE_RATE
        wave = sum(weights(h) * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
                   for h in range(1, 16) if h * f0 < SAMPLE_RATE / 2 - 500)
    attack = max(1, int(rng.uniform(0.01, 0.08) * SAMPLE_RATE))
    env = np.minimum(1.0, np.arange(length) / attack) * np.exp(-tn * rng.uniform(0.3, 2.0))
    note[start:start + length] = wave * env
    return note


def _event_clip(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[dict]]:
    x = np.zeros(n)
    events = []
    slots = np.sort(rng.choice(4, size=int(rng.integers(1, 4)), replace=False))
    slot_len = n // 4
    for s in slots:
        label = EVENT_LABELS[int(rng.integers(0, 2))]
        f0 = (220.0 if label == "low" else 1760.0) * 2 ** rng.uniform(-0.25, 0.25)
        start = s * slot_len + int(rng.uniform(0, 0.3) * slot_len)
        length = int(rng.uniform(0.3, 0.6) * slot_len)
        seg = _harmonic(rng, f0, length, 3) * np.hanning(length)
        x[start:start + length] += seg
        events.append({"label": label, "start": 1000.0 * start / SAMPLE_RATE,
                       "end": 1000.0 * (start + length) / SAMPLE_RATE})
    return _finish(rng, x, noise_level=0.1), events


def _split_of(i: int, total: int) -> str:
    edges = np.cumsum(SPLIT_FRACTIONS) * total
    return SPLITS[int(np.searchsorted(edges, i, side="right"))]


VERSION = "mwmae-synthetic-1"


class TaskError(ValueError):
    """Settings or an output folder this tool refuses; the message names the flag or path."""


def _check_settings(kind: str, per_class: int, duration_s: float, seed: int, name: str) -> None:
    if kind not in KINDS:
        raise TaskError(f"unknown task kind {kind!r}; known: {list(KINDS)}")
    if per_class < 5:
        raise TaskError(f"--per-class {per_class}: at least 5 clips per label so that each "
                        "split gets one")
    if not math.isfinite(duration_s) or duration_s < 0.1:
        raise TaskError(f"--duration {duration_s:g}: expected at least 0.1 seconds per clip")
    if seed < 0:
        raise TaskError(f"--seed {seed}: expected a whole number >= 0")
    if name in ("", ".", "..") or "/" in name or os.sep in name or name.startswith("."):
        raise TaskError(f"--name {name!r}: expected a plain folder name (the task becomes a "
                        "folder inside the tasks directory)")


def _plan(kind: str, per_class: int) -> list[tuple[str, str, str | None]]:
    """(split, file name, label) of every clip, in the order they are drawn (label None:
    an event clip, whose events are drawn with it)."""
    if kind == "events":
        total = per_class * len(EVENT_LABELS)
        return [(_split_of(i, total), f"{i:05d}.wav", None) for i in range(total)]
    return [(_split_of(i, per_class), f"{label}_{i:04d}.wav", label)
            for label in SCENE_KINDS[kind] for i in range(per_class)]


def _same_task(task: pathlib.Path, kind: str, per_class: int, duration_s: float, seed: int,
               name: str) -> bool:
    """Whether ``task`` is what these settings would write (by this tool, so a rerun keeps
    it)."""
    try:
        meta = json.loads((task / "task_metadata.json").read_text())
        files = {s: set(json.loads((task / f"{s}.json").read_text())) for s in SPLITS}
    except (OSError, ValueError):
        return False
    want: dict[str, set[str]] = {s: set() for s in SPLITS}
    for split, fname, _ in _plan(kind, per_class):
        want[split].add(fname)
    return (isinstance(meta, dict) and meta.get("version") == VERSION
            and meta.get("kind") == kind and meta.get("seed") == seed
            and meta.get("sample_duration") == duration_s and meta.get("task_name") == name
            and files == want)


def _written_by_this_tool(task: pathlib.Path) -> bool:
    try:
        meta = json.loads((task / "task_metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("version", "")).startswith("mwmae-synthetic")


def make_task(root: str | pathlib.Path, kind: str = "chords", *, per_class: int = 24,
              duration_s: float = 2.0, seed: int = 0, name: str | None = None,
              overwrite: bool = False, log: Callable[[str], Any] = print) -> pathlib.Path:
    """Write one task under ``root`` and return its folder (``root`` is the ``--tasks-dir``).

    ``per_class`` clips per label (scene) or ``per_class * 2`` clips (events), split 60/20/20
    into train/valid/test with every label in every split.

    The task is written beside its folder and moved into place when complete. A folder that
    already holds this very task (same settings) is kept as it is; one this tool wrote with
    other settings is replaced only with ``overwrite``; anything else there is refused
    (TaskError), as is a ``root`` that is an artifact or a training workdir.
    """
    name = name or f"mwmae_{kind}"
    _check_settings(kind, per_class, duration_s, seed, name)
    root = pathlib.Path(root)
    for what, probe in (("an mwmae artifact", _is_artifact), ("a training workdir", _is_workdir),
                        ("an evaluation's output folder", _is_evaluation)):
        if root.is_dir() and probe(root):
            raise TaskError(f"{root}: is {what}; write tasks to a tasks directory of their own. "
                            "Nothing was written.")
    task = root / name
    if task.exists() and not (task.is_dir() and not any(task.iterdir())):
        if _same_task(task, kind, per_class, duration_s, seed, name):
            log(f"{task}: already holds this task (same settings); left as it is")
            return task
        if not task.is_dir() or not _written_by_this_tool(task):
            raise TaskError(f"{task}: exists and is not a task this tool wrote; choose another "
                            "--name or tasks directory (--overwrite replaces only this tool's "
                            "tasks). Nothing was written.")
        if not overwrite:
            raise TaskError(f"{task}: holds this task with other settings; pass --overwrite to "
                            "replace it (evaluations of the old one then need --overwrite "
                            "too). Nothing was written.")
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = root / f".{name}.partial-{tag}"
    try:
        _write_task(staging, kind, per_class=per_class, duration_s=duration_s, seed=seed,
                    name=name)
        if task.exists():
            old = root / f".{name}.old-{tag}"
            os.rename(task, old)
            try:
                os.rename(staging, task)
            except BaseException:
                os.rename(old, task)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, task)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return task


def _is_artifact(path: pathlib.Path) -> bool:
    from mwmae.artifact import is_artifact

    return is_artifact(path)


def _is_evaluation(path: pathlib.Path) -> bool:
    from mwmae.hear.evaluate import FINGERPRINT

    return (path / FINGERPRINT).is_file()


def _is_workdir(path: pathlib.Path) -> bool:
    from mwmae.workdir import Workdir

    return Workdir.looks_like_one(path)


def _write_task(task: pathlib.Path, kind: str, *, per_class: int, duration_s: float, seed: int,
                name: str) -> None:
    n = int(round(duration_s * SAMPLE_RATE))
    rng = np.random.default_rng(seed)
    is_event = kind == "events"
    labels = EVENT_LABELS if is_event else SCENE_KINDS[kind]
    split_data: dict[str, dict] = {s: {} for s in SPLITS}
    task.mkdir(parents=True)

    def write(split: str, fname: str, x: np.ndarray, target) -> None:
        folder = task / str(SAMPLE_RATE) / split
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(folder / fname, x, SAMPLE_RATE, subtype="PCM_16")
        split_data[split][fname] = target

    for split, fname, label in _plan(kind, per_class):
        if label is None:
            x, events = _event_clip(rng, n)
            write(split, fname, x, events)
        else:
            write(split, fname, _scene_clip(kind, label, rng, n, split), [label])

    for split, data in split_data.items():
        (task / f"{split}.json").write_text(json.dumps(data, indent=1))
    with open(task / "labelvocabulary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "label"])
        w.writerows(enumerate(labels))
    meta = {
        "task_name": name, "version": VERSION, "mode": "full",
        "embedding_type": "event" if is_event else "scene",
        "prediction_type": "multilabel" if is_event else "multiclass",
        "split_mode": "trainvaltest", "sample_duration": duration_s,
        "evaluation": (["event_onset_200ms_fms", "segment_1s_er"] if is_event
                       else ["top1_acc"]),
        "splits": list(SPLITS), "sample_rate": SAMPLE_RATE, "seed": seed, "kind": kind,
        # hear-eval-kit's grids assume thousands of clips (batch 1024: one step per epoch here);
        # these tasks have tens, so the predictor takes small batches and more epochs.
        "evaluation_params": {"task_specific_param_grid": SMALL_TASK_GRID},
    }
    (task / "task_metadata.json").write_text(json.dumps(meta, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.hear.tasks",
                                description="Write a small synthetic HEAR-format task.")
    p.add_argument("out", help="tasks directory (the task becomes a folder inside it)")
    p.add_argument("--kind", choices=KINDS, default="chords")
    p.add_argument("--per-class", dest="per_class", type=int, default=24)
    p.add_argument("--duration", type=float, default=2.0, help="seconds per clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="task folder name (default mwmae_<kind>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a task this tool wrote with other settings (the same "
                        "settings again keep it as it is)")
    a = cli.parse_args(p, argv)
    kept: list[str] = []

    def log(message: str) -> None:
        kept.append(message)
        print(message)

    try:
        task = make_task(a.out, a.kind, per_class=a.per_class, duration_s=a.duration,
                         seed=a.seed, name=a.name, overwrite=a.overwrite, log=log)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {a.out}: {e}", file=sys.stderr)
        return 1
    counts = {s: len(json.loads((task / f"{s}.json").read_text())) for s in SPLITS}
    print(f"{'kept' if kept else 'wrote'} {task}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
