"""Spoken words from eSpeak NG, the demo corpus and the spoken-digits task."""

import json
import pathlib

import numpy as np
import pytest
import soundfile as sf

from mwmae import speech
from mwmae.demo import corpus
from mwmae.hear import tasks


def test_say_gives_trimmed_16k_speech_that_depends_on_word_and_voice():
    a = speech.say("seven", speech.Voice("en-us+m3"))
    assert a.dtype == np.float32 and a.ndim == 1
    assert 0.2 * 16000 < len(a) < 1.5 * 16000
    assert np.abs(a[:50]).max() > 5e-4 and np.abs(a[-50:]).max() > 5e-4  # silence trimmed
    assert 0.05 < np.abs(a).max() <= 1.0
    b = speech.say("seven", speech.Voice("en-us+f3", pitch=80))
    c = speech.say("two", speech.Voice("en-us+m3"))
    assert len(b) != len(a) or not np.allclose(a, b)
    assert len(c) != len(a) or not np.allclose(a, c)
    # eSpeak NG varies a little from call to call within a process (a few ms of timing and
    # phase): the same word and voice is the same sound, not the same samples.
    again = speech.say("seven", speech.Voice("en-us+m3"))
    assert abs(len(again) - len(a)) < 0.05 * len(a)
    spectrum = lambda x: np.log(np.abs(np.fft.rfft(x, 16384)) + 1e-3)  # noqa: E731
    assert np.corrcoef(spectrum(a), spectrum(again))[0, 1] > 0.7
    with pytest.raises(ValueError, match="unknown eSpeak voice 'xx-nowhere'"):
        speech.say("seven", speech.Voice("xx-nowhere"))


def test_random_voices_span_accents_variants_rates_and_pitches():
    rng = np.random.default_rng(0)
    voices = [speech.random_voice(rng) for _ in range(200)]
    assert len({v.name for v in voices}) > 50
    assert all(120 <= v.rate < 230 and 20 <= v.pitch < 80 for v in voices)
    only = speech.random_voice(rng, accents=("en",), variants=("f2",))
    assert only.name == "en+f2"


def test_digit_task_speakers_of_the_splits_are_disjoint(tmp_path):
    splits = tasks._SPLIT_VARIANTS
    assert not set(splits["train"]) & (set(splits["valid"]) | set(splits["test"]))
    assert not set(splits["valid"]) & set(splits["test"])
    assert set().union(*splits.values()) <= set(speech.VARIANTS)
    task = tasks.make_task(tmp_path, "digits", per_class=5, seed=0)
    assert (task / "labelvocabulary.csv").read_text().count("\n") == 11
    test = json.loads((task / "test.json").read_text())
    assert sorted({v[0] for v in test.values()}) == sorted(tasks.SCENE_KINDS["digits"])


def test_corpus_layout_counts_determinism_and_resume(tmp_path):
    counts = corpus.make_corpus(tmp_path / "c", clips=20, duration_s=2.5, seed=3)
    assert counts == {"speech": 12, "tones": 4, "noise": 4}
    files = sorted((tmp_path / "c").rglob("*.wav"))
    assert len(files) == 20 and not list((tmp_path / "c").rglob("*.tmp.wav"))
    for f in files:
        x, rate = sf.read(f, dtype="float32")
        assert rate == 16000 and x.shape == (40000,) and 0.01 < np.abs(x).max() <= 1.0
    # A rerun keeps what is there and remakes only what is missing: structured sounds
    # identically, speech up to eSpeak NG's own small variation.
    tone = tmp_path / "c" / "tones" / "tones_00013.wav"
    spoken = tmp_path / "c" / "speech" / "speech_00002.wav"
    before = {f: f.read_bytes() for f in (tone, spoken)}
    stamps = {f: f.stat().st_mtime_ns for f in files}
    tone.unlink()
    spoken.unlink()
    corpus.make_corpus(tmp_path / "c", clips=20, duration_s=2.5, seed=3)
    assert tone.read_bytes() == before[tone]
    assert len(spoken.read_bytes()) == len(before[spoken])
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f not in before)


def test_corpus_without_espeak_is_structured_sounds_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(speech, "available", lambda: False)
    counts = corpus.make_corpus(tmp_path, clips=6, duration_s=1.0)
    assert counts == {"tones": 3, "noise": 3}
    assert "no speech in the corpus" in capsys.readouterr().err


def test_missing_espeak_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_espeak(name, *args, **kwargs):
        if name == "espeakng_loader":
            raise ImportError("No module named 'espeakng_loader'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_espeak)
    with pytest.raises(speech.SpeechUnavailable, match=r"pip install -e \"\.\[demo\]\""):
        speech._Engine()


def test_corpus_cli(tmp_path, capsys):
    assert corpus.main([str(tmp_path), "--clips", "4", "--duration", "1.0"]) == 0
    assert "speech" in capsys.readouterr().out
    assert len(list(pathlib.Path(tmp_path).rglob("*.wav"))) == 4
