"""The HEAR 2021 module: parity with the original HEAR module's recorded outputs, its padding
rule and timestamps, bounded compilation and memory, bad input, and hear-validator."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import hear_mwmae
import mwmae
import mwmae.hear as hear
from mwmae import audio
from mwmae.api import Model
from mwmae.artifact import ArtifactError, save_artifact
from mwmae.export import export_original
from mwmae.hear.embed import Embedder, bucket_sizes, num_embedding_frames, timestamps_ms
from mwmae.model import init_params

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(original_checkpoint, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("hear_artifact")
    export_original(str(original_checkpoint), str(out))
    return out


@pytest.fixture(scope="module")
def model(artifact):
    return hear.load_model(str(artifact))


@pytest.fixture(scope="module")
def hear_fixtures(reference_dir):
    return dict(np.load(reference_dir / "hear_fixtures.npz"))


def _tiny_model(seed: int = 0) -> Model:
    config = mwmae.model_config("tiny", depth=1, embed_dim=64, num_heads=4, decoder_depth=1,
                                decoder_embed_dim=32, decoder_num_heads=2,
                                decoder_window_sizes=0)
    return Model(config, init_params(config, jax.random.key(seed)))


@pytest.fixture(scope="module")
def tiny() -> Model:
    return _tiny_model()


def original_rule(features: np.ndarray, model: Model) -> np.ndarray:
    """The original HEAR module's chunking, transcribed literally: pad 200 - T % 200 frames by
    reflection (a whole chunk when T % 200 == 0), run every chunk, drop floor(pad / 4) frames
    (the original's 4 is the temporal patch p: floor(pad / p) for other patches)."""
    p = model.config.patch_size[0]
    b, t, m = features.shape
    pad = 200 - t % 200
    padded = np.pad(features, ((0, 0), (0, pad), (0, 0)), mode="reflect")
    chunks = padded.reshape(b, -1, 200, m)
    out = np.concatenate([np.asarray(model.features(chunks[:, i, :, :, None]))
                          for i in range(chunks.shape[1])], axis=1)
    return out[:, :out.shape[1] - pad // p]


# ---- parity with the recorded original -------------------------------------------------------

def test_from_recorded_features_matches_original(model, hear_fixtures):
    e = model.embedder
    emb = e.embed_normalised(hear_fixtures["hear_features"])
    assert emb.shape == hear_fixtures["hear_timestamp_embeddings"].shape == (2, 63, 960)
    np.testing.assert_allclose(emb, hear_fixtures["hear_timestamp_embeddings"], atol=1e-5, rtol=0)
    scene = e.scene_normalised(hear_fixtures["hear_features"][..., 0])
    np.testing.assert_allclose(scene, hear_fixtures["hear_scene_embeddings"], atol=1e-5, rtol=0)


def test_padding_of_recorded_features_is_the_originals(hear_fixtures):
    from mwmae.hear.embed import chunk_features

    chunks = chunk_features(hear_fixtures["hear_features"][..., 0])
    np.testing.assert_array_equal(chunks.reshape(2, 400, 80),
                                  hear_fixtures["hear_padded_input"][..., 0])


def test_end_to_end_from_waveform_matches_original(model, hear_fixtures):
    wav = torch.from_numpy(hear_fixtures["hear_waveform"])
    emb, ts = hear.get_timestamp_embeddings(wav, model)
    scene = hear.get_scene_embeddings(wav, model)
    assert emb.dtype == torch.float32 and ts.dtype == torch.float32 and scene.dtype == torch.float32
    assert tuple(emb.shape) == (2, 63, 960) and tuple(ts.shape) == (2, 63)
    np.testing.assert_allclose(emb.numpy(), hear_fixtures["hear_timestamp_embeddings"], atol=2e-3,
                               rtol=0)
    np.testing.assert_allclose(scene.numpy(), hear_fixtures["hear_scene_embeddings"], atol=2e-3,
                               rtol=0)
    np.testing.assert_allclose(scene.numpy(), emb.numpy().mean(axis=1), atol=1e-5)


def test_timestamps_are_frame_centres_not_the_originals_starts(model, hear_fixtures):
    wav = torch.from_numpy(hear_fixtures["hear_waveform"])
    _, ts = hear.get_timestamp_embeddings(wav, model)
    want = 15.0 + 40.0 * np.arange(63)
    np.testing.assert_allclose(ts.numpy(), np.stack([want, want]), atol=1e-4)
    # The original: i * duration / n_frames, from 0 (frame starts on a 39.68 ms grid).
    orig = hear_fixtures["hear_timestamps"]
    np.testing.assert_allclose(orig[0], np.arange(63) * 2500.0 / 63, atol=1e-3)
    assert not np.allclose(ts.numpy(), orig, atol=1.0)
    # Every centre lies inside the clip.
    assert ts.numpy().max() < 2500.0


def test_padding_rule_equals_the_original_rule(tiny):
    e = Embedder(tiny, max_batch=4)
    for frames in (2, 150, 199, 200, 201, 400, 451):
        rng = np.random.default_rng(frames)
        feats = rng.standard_normal((2, frames, 80)).astype(np.float32)
        got = e.embed_normalised(feats)
        want = original_rule(feats, tiny)
        assert got.shape == want.shape == (2, -(-frames // 4), tiny.config.feature_dim), frames
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{frames} frames")


@pytest.mark.parametrize("samples", [31_840, 31_999, 63_840])  # 200, 200 and 400 STFT frames
def test_clips_whose_frames_are_a_multiple_of_200(samples, model, hear_fixtures):
    assert audio.num_frames(samples) % 200 == 0
    rng = np.random.default_rng(samples)
    wav = (0.3 * rng.standard_normal((1, samples))).astype(np.float32)
    emb, ts = hear.get_timestamp_embeddings(torch.from_numpy(wav), model)
    t = audio.num_frames(samples)
    assert emb.shape[1] == ts.shape[1] == t // 4 == num_embedding_frames(samples)
    feats = model.embedder.normalised_logmel(wav)
    want = original_rule(feats, model.embedder.model)
    assert want.shape[1] == t // 4
    np.testing.assert_allclose(emb.numpy(), want, atol=1e-5, rtol=0)


# ---- compilation, batching, long audio -------------------------------------------------------

def test_no_recompilation_within_the_bucket_set(tiny):
    e = Embedder(tiny, max_batch=4)
    assert e.buckets == bucket_sizes(4) == (1, 2, 4)
    e.warm_up()
    assert e.traces == 3
    rng = np.random.default_rng(0)
    for n_clips, seconds in [(1, 0.5), (3, 1.0), (2, 2.0), (1, 7.3), (5, 3.1), (1, 2.01)]:
        wav = rng.uniform(-0.5, 0.5, (n_clips, int(seconds * 16000))).astype(np.float32)
        emb, ts = e.timestamp_embeddings(wav)
        assert emb.shape == (n_clips, num_embedding_frames(wav.shape[1]), e.embedding_size)
        e.scene_embeddings(wav)
    assert e.traces == 3, "a clip length outside the warmed buckets recompiled the encoder"


def test_batching_does_not_change_embeddings(tiny):
    m = tiny
    rng = np.random.default_rng(1)
    wav = rng.uniform(-0.5, 0.5, (3, 5 * 16000)).astype(np.float32)
    a, _ = Embedder(m, max_batch=1).timestamp_embeddings(wav)
    b, _ = Embedder(m, max_batch=16).timestamp_embeddings(wav)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    single, _ = Embedder(m, max_batch=16).timestamp_embeddings(wav[1:2])
    np.testing.assert_allclose(single[0], b[1], atol=1e-5, rtol=0)


def test_twenty_minutes_of_audio_in_bounded_batches(tiny):
    e = Embedder(tiny, max_batch=8)
    seen = []
    encode = e._encode
    e._encode = lambda p, x: (seen.append(x.shape[0]), encode(p, x))[1]
    n = 20 * 60 * 16000
    wav = (0.1 * np.sin(np.arange(n) * 2 * np.pi * 440 / 16000)).astype(np.float32)[None]
    emb, ts = e.timestamp_embeddings(wav)
    assert emb.shape == (1, 30_001, e.embedding_size) and ts.shape == (1, 30_001)
    assert max(seen) <= 8 and sum(seen) >= 601
    scene = e.scene_embeddings(wav)
    np.testing.assert_allclose(scene[0], emb[0].mean(axis=0, dtype=np.float64), atol=1e-5)
    assert e.traces <= len(e.buckets)


def test_timestamps_helper():
    np.testing.assert_allclose(timestamps_ms(32_000), 15 + 40 * np.arange(51))
    assert num_embedding_frames(40_000) == 63


# ---- the module's API, options and errors ----------------------------------------------------

def test_model_attributes_and_top_level_module(model):
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 960
    assert isinstance(model.scene_embedding_size, int)
    for name in ("load_model", "get_scene_embeddings", "get_timestamp_embeddings"):
        assert getattr(hear_mwmae, name) is getattr(hear, name)


def test_bfloat16_option_is_close_to_float32(artifact, hear_fixtures):
    wav = torch.from_numpy(hear_fixtures["hear_waveform"])
    m16 = hear.load_model(str(artifact), dtype="bfloat16", batch_size=2)
    assert m16.embedder.model.config.dtype == "bfloat16"
    got = hear.get_scene_embeddings(wav, m16).numpy()
    want = hear_fixtures["hear_scene_embeddings"]
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_full_and_encoder_only_artifacts_embed_the_same(original_checkpoint, tmp_path, model,
                                                        hear_fixtures):
    export_original(str(original_checkpoint), str(tmp_path / "full"), with_decoder=True)
    full = hear.load_model(str(tmp_path / "full"))
    wav = torch.from_numpy(hear_fixtures["hear_waveform"])
    np.testing.assert_array_equal(hear.get_scene_embeddings(wav, full).numpy(),
                                  hear.get_scene_embeddings(wav, model).numpy())


@pytest.mark.parametrize("bad, message", [
    (np.zeros(32000, np.float32), "add a batch axis"),
    (np.zeros((2, 2, 32000), np.float32), "mix the channels down"),
    (np.zeros((32000, 2), np.float32), "(n_samples, channels)"),
    (np.zeros((2, 0), np.float32), "empty"),
    (np.zeros((0, 32000), np.float32), "empty"),
    (np.zeros((1, 100), np.float32), "at least 201"),
    (np.full((1, 32000), np.nan, np.float32), "NaN"),
    (np.zeros((1, 32000), np.int16), "dtype"),
])
def test_bad_audio_is_refused_clearly(model, bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hear.get_timestamp_embeddings(torch.from_numpy(bad), model)
    with pytest.raises(ValueError):
        hear.get_scene_embeddings(torch.from_numpy(bad), model)


def test_wrong_sample_rate_is_refused(model):
    wav = np.zeros((1, 44100), np.float32)
    with pytest.raises(ValueError, match="44100 Hz.*16000 Hz mono: resample"):
        model.embedder.scene_embeddings(wav, sample_rate=44100)


def test_wrong_types_are_refused(model):
    with pytest.raises(TypeError, match="torch.Tensor"):
        hear.get_scene_embeddings([0.0] * 32000, model)
    with pytest.raises(TypeError, match="load_model"):
        hear.get_scene_embeddings(torch.zeros(1, 32000), object())


def test_missing_or_corrupt_artifacts_fail_clearly(artifact, tmp_path):
    with pytest.raises(ValueError, match="needs model_file_path"):
        hear.load_model("")
    with pytest.raises(FileNotFoundError, match="no such artifact"):
        hear.load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model"):
        hear.load_model(str(tmp_path / "empty"))
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bad / f).write_bytes((artifact / f).read_bytes())
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="model.safetensors: checksum .*corrupt or partially"):
        hear.load_model(str(bad))


def test_config_weights_mismatch_fails_clearly(tmp_path, tiny):
    m = tiny
    save_artifact(tmp_path / "a", m.config.replace(depth=2), m.params, encoder_only=True)
    with pytest.raises(ArtifactError, match="weights do not match the config"):
        hear.load_model(str(tmp_path / "a"))


# ---- the official validator -----------------------------------------------------------------

def test_hear_validator_passes(artifact):
    exe = pathlib.Path(sys.executable).parent / "hear-validator"
    assert exe.exists(), ("hear-validator is not installed in this environment: pip install "
                          "--no-deps hearvalidator (see the README's HEAR install steps)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([str(exe), "hear_mwmae", "-m", str(artifact), "-d", "cpu"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0 and "Looks good!" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "timestamp_embedding_size: 960" in r.stdout
