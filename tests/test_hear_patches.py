"""The HEAR embedder follows the model's temporal patch: p STFT frames per embedding frame
(frame hop 10 p ms, ceil(T / p) frames, centres at 10 p i + 5 (p - 1) ms), for p = 2, 4, 8."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_hear import original_rule

import mwmae
from mwmae import audio
from mwmae.api import Model
from mwmae.artifact import save_artifact
from mwmae.hear.embed import Embedder, frame_hop_ms, num_embedding_frames, timestamps_ms
from mwmae.model import init_params

REPO = pathlib.Path(__file__).resolve().parents[1]
PATCHES = (2, 4, 8)


def tiny(p: int) -> Model:
    config = mwmae.model_config("tiny", depth=1, embed_dim=64, num_heads=4, decoder_depth=1,
                                decoder_embed_dim=32, decoder_num_heads=2,
                                decoder_window_sizes=0, patch_size=(p, 16))
    return Model(config, init_params(config, jax.random.key(p)))


@pytest.fixture(scope="module", params=PATCHES)
def model(request) -> Model:
    return tiny(request.param)


def test_frames_follow_the_patch_and_equal_the_originals_rule(model):
    p = model.config.patch_size[0]
    e = Embedder(model, max_batch=4)
    for frames in (3, 150, 199, 200, 201, 451):
        feats = np.random.default_rng(frames).standard_normal((2, frames, 80)).astype(np.float32)
        got = e.embed_normalised(feats)
        assert got.shape == (2, -(-frames // p), model.config.feature_dim), (p, frames)
        np.testing.assert_allclose(got, original_rule(feats, model), atol=1e-5, rtol=0)


def test_timestamps_are_the_centres_of_each_frames_stft_frames(model):
    p = model.config.patch_size[0]
    e = Embedder(model, max_batch=4)
    for samples in (16_000, 25_000, 31_840):
        wav = (0.1 * np.random.default_rng(samples).standard_normal((1, samples))
               ).astype(np.float32)
        emb, ts = e.timestamp_embeddings(wav)
        n = num_embedding_frames(samples, p)
        assert emb.shape[1] == ts.shape[1] == n == -(-audio.num_frames(samples) // p)
        stft_centres = 10.0 * np.arange(n * p).reshape(n, p)   # centred STFT, 10 ms hop
        np.testing.assert_allclose(ts[0], stft_centres.mean(axis=1), atol=1e-3)
        np.testing.assert_allclose(np.diff(ts[0]), frame_hop_ms(p), atol=1e-3)
        # The last frame may hold up to p - 1 padding frames: its centre lies at most
        # 5 (p - 1) ms past the clip's last STFT frame.
        last_stft = 10.0 * (audio.num_frames(samples) - 1)
        assert ts[0, -1] <= last_stft + 5 * (p - 1) + 1e-3
    np.testing.assert_allclose(timestamps_ms(32_000, 4), 15 + 40 * np.arange(51))


def test_scene_embeddings_average_the_clips_frames_and_no_padding(model):
    p = model.config.patch_size[0]
    e = Embedder(model, max_batch=4)
    samples = 24_000                       # 151 STFT frames: the chunk is mostly padding
    wav = (0.2 * np.random.default_rng(p).standard_normal((2, samples))).astype(np.float32)
    emb, _ = e.timestamp_embeddings(wav)
    scene = e.scene_embeddings(wav)
    np.testing.assert_allclose(scene, emb.mean(axis=1), atol=1e-5)
    # The chunk's frames beyond the clip (what a mean over the padded chunk would include).
    chunk = e.embed_normalised(np.pad(e.normalised_logmel(wav), ((0, 0), (0, 49), (0, 0)),
                                      mode="reflect"))
    assert chunk.shape[1] == 200 // p > emb.shape[1]
    assert not np.allclose(scene, chunk.mean(axis=1), atol=1e-4)


@pytest.mark.slow  # hear-validator in a subprocess
def test_hear_validator_passes_for_an_8x16_model(tmp_path):
    m = tiny(8)
    save_artifact(str(tmp_path / "art"), m.config, jax.device_get(m.params), source="test",
                  encoder_only=True)
    exe = pathlib.Path(sys.executable).parent / "hear-validator"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([str(exe), "hear_mwmae", "-m", str(tmp_path / "art"), "-d", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0 and "Looks good!" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Interval between timestamps is 80.0ms" in r.stdout
