"""Log-mel front end parity with the original (torchaudio) HEAR module's recorded outputs."""

import jax
import numpy as np
import pytest

from mwmae import audio

# Above these reference log-mel levels (mel power > 2e-4 and > 3.4e-4) the front ends agree with
# torchaudio to 1e-4. Below them torch's own float32 FFT rounding dominates (torch's float32
# STFT differs from an exact transform by ~4e-4 there), which no other FFT reproduces; the
# float32 XLA FFT adds its own rounding of the same size.
AUDIBLE_FLOOR = {"numpy": -8.5, "jax": -8.0}


@pytest.fixture(scope="module")
def hear(reference_dir):
    with np.load(reference_dir / "hear_fixtures.npz") as data:
        return {k: data[k] for k in data.files}


def test_filterbank_matches_torchaudio_bit_for_bit(hear):
    fbank = audio.mel_filterbank()
    assert fbank.dtype == np.float32 and fbank.shape == (201, 80)
    np.testing.assert_array_equal(fbank, hear["hear_mel_fbank_torchaudio"])


def test_window_is_periodic_hann():
    window = audio.hann_window()
    n = np.arange(400)
    np.testing.assert_allclose(window, 0.5 - 0.5 * np.cos(2 * np.pi * n / 400), atol=3e-7)
    assert window[0] == 0.0 and window.dtype == np.float32


@pytest.mark.parametrize("impl", ["numpy", "jax"])
def test_log_mel_matches_reference(hear, impl):
    waveform = hear["hear_waveform"]
    reference = hear["hear_logmel"].transpose(0, 2, 1)  # torchaudio's (B, mel, T) -> time-major
    if impl == "numpy":
        ours = audio.log_mel_spectrogram_numpy(waveform)
        overall = 4e-4
    else:
        ours = np.asarray(jax.jit(audio.log_mel_spectrogram)(waveform))
        overall = 1e-3  # float32 FFT on both sides
    assert ours.shape == reference.shape == (2, audio.num_frames(40000), 80)
    assert ours.dtype == np.float32
    err = np.abs(ours - reference)
    audible = reference > AUDIBLE_FLOOR[impl]
    assert audible.mean() > 0.995
    assert err[audible].max() <= 1e-4, err[audible].max()
    assert err.max() <= overall, err.max()
    assert (err > 1e-4).sum() <= 16


def test_numpy_and_jax_agree_and_chunking_is_seamless():
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 3) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float32
    )
    whole = audio.log_mel_spectrogram_numpy(wave)
    chunked = audio.log_mel_spectrogram_numpy(wave, chunk_frames=7)
    np.testing.assert_array_equal(whole, chunked)
    np.testing.assert_allclose(np.asarray(audio.log_mel_spectrogram(wave)), whole, atol=2e-4)
    assert whole.shape == (audio.num_frames(wave.size), 80)


def test_normalisation_matches_hear_features(hear):
    # The HEAR module normalises torchaudio's log-mel with the unbiased std.
    logmel = hear["hear_logmel"].transpose(0, 2, 1)[..., None]
    np.testing.assert_allclose(
        audio.normalize_for_hear(logmel, batch_dims=1), hear["hear_features"], atol=1e-6
    )
    jax_out = audio.normalize_for_hear(jax.numpy.asarray(logmel), batch_dims=1)
    np.testing.assert_allclose(np.asarray(jax_out), hear["hear_features"], atol=1e-5)


def test_pretraining_normalisation_uses_population_std():
    x = np.random.default_rng(1).standard_normal((3, 20, 80)).astype(np.float32) * 4 + 2
    out = audio.normalize_for_pretraining(x, batch_dims=1)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1, atol=1e-5)
    hear = audio.normalize_for_hear(x, batch_dims=1)
    assert not np.allclose(out, hear)


def test_too_short_waveform_is_rejected():
    with pytest.raises(ValueError, match="samples"):
        audio.log_mel_spectrogram_numpy(np.zeros(100, np.float32))
