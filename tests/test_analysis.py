"""The attention analysis: metrics against closed forms and direct formulas, the patch grid's
units against the front end, the model's capture option, and the CLI end to end."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mwmae import audio
from mwmae.analysis import __main__ as analysis_cli
from mwmae.analysis import capture, metrics
from mwmae.analysis.geometry import PatchGrid, band_centres_hz, hz_to_mel, mel_bin_centres_hz
from mwmae.artifact import front_end, save_artifact
from mwmae.data import records
from mwmae.kernels import multi_window_attention, multi_window_attention_with_probs
from mwmae.model import Encoder, MaskedAutoencoder, ModelConfig, init_params
from mwmae.train.config import TINY_MODEL
from mwmae.workdir import Workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ModelConfig(**TINY_MODEL, attention_impl="xla")  # decoder windows (5, 25, 0, 0)


def params_of(config: ModelConfig, seed: int):
    # jitted: tracing the initialisation eagerly takes seconds per module.
    return jax.jit(lambda key: init_params(config, key))(jax.random.key(seed))


# ---- metrics against closed forms ------------------------------------------------------------

def ring(n: int) -> np.ndarray:
    """Distances on a ring of n tokens: every query sees the same neighbourhood."""
    i = np.arange(n)
    d = np.abs(i[:, None] - i[None, :])
    return np.minimum(d, n - d).astype(float)


@pytest.mark.parametrize("r", [0, 1, 3, 7])
def test_uniform_attention_over_a_radius_has_the_closed_form_distance_and_entropy(r):
    n = 40
    d = ring(n)
    probs = (d <= r) / (2 * r + 1.0)  # uniform over j in [i - r, i + r]
    probs = np.broadcast_to(probs, (3, 2, n, n))  # 3 clips, 2 heads
    np.testing.assert_allclose(metrics.mean_attention_distance(probs, d),
                               [r * (r + 1) / (2 * r + 1)] * 2, rtol=1e-12)
    np.testing.assert_allclose(metrics.attention_entropy(probs), [math.log(2 * r + 1)] * 2,
                               rtol=1e-12, atol=1e-15)


def test_one_hot_attention_has_zero_distance_and_entropy_and_far_keys_count():
    n = 12
    d = ring(n)
    eye = np.broadcast_to(np.eye(n), (2, 1, n, n))
    assert metrics.mean_attention_distance(eye, d).tolist() == [0.0]
    assert metrics.attention_entropy(eye).tolist() == [0.0]
    # Every query attends one key 3 tokens ahead: distance 3, still entropy 0.
    ahead = np.broadcast_to(np.roll(np.eye(n), 3, axis=1), (2, 1, n, n))
    assert metrics.mean_attention_distance(ahead, d).tolist() == [3.0]
    assert metrics.attention_entropy(ahead).tolist() == [0.0]


def test_edge_queries_count_in_the_mean_on_the_real_time_axis():
    # A 1-D grid (one frequency patch): queries at least r from both edges spread evenly over
    # [i - r, i + r], the others attend to themselves.
    grid = PatchGrid(20, 1, 4, 80, 160, 16000, 80, 50.0, 8000.0)
    n, r = 20, 2
    probs = np.zeros((n, n))
    for i in range(n):
        if r <= i < n - r:
            probs[i, i - r:i + r + 1] = 1 / (2 * r + 1)
        else:
            probs[i, i] = 1.0
    interior = n - 2 * r
    want = interior * r * (r + 1) / (2 * r + 1) / n
    got = metrics.mean_attention_distance(probs[None, None], grid.distances()["time_patches"])
    np.testing.assert_allclose(got, [want], rtol=1e-12)
    np.testing.assert_allclose(metrics.attention_entropy(probs[None, None]),
                               [interior * math.log(2 * r + 1) / n], rtol=1e-12)


def test_uniform_window_probs_are_the_models_windows():
    p = metrics.uniform_window_probs(10, 5)
    assert p[0, 4] == 0.2 and p[4, 5] == 0.0 and np.allclose(p.sum(1), 1)
    shifted = metrics.uniform_window_probs(10, 5, shift=True)  # windows {2..6}, {7..9, 0, 1}
    assert shifted[4, 5] == 0.2 and shifted[1, 2] == 0.0 and shifted[9, 0] == 0.2
    np.testing.assert_allclose(metrics.attention_entropy(p[None, None]), [math.log(5)])


# ---- the grid and its units ------------------------------------------------------------------

def test_grid_distances_in_patches_time_and_frequency():
    grid = PatchGrid.from_config(TINY, front_end())
    assert (grid.time_patches, grid.freq_patches) == (50, 5)
    assert grid.ms_per_patch == 40.0  # 4 frames x hop 160 at 16 kHz
    t, f = grid.positions()
    assert (t[2 * 5 + 1], f[2 * 5 + 1]) == (2, 1)  # token n = t * 5 + f
    # Every query attends to the one token 3 time patches and 3 frequency patches away
    # (queries 0 .. 9 with t <= 1, f <= 1 only, the rest one-hot on themselves).
    n = grid.num_tokens
    probs = np.eye(n)
    queries = [tt * 5 + ff for tt in range(2) for ff in range(2)]
    for q in queries:
        probs[q] = 0.0
        probs[q, q + 3 * 5 + 3] = 1.0
    d = grid.distances()
    share = len(queries) / n
    mean = lambda unit: metrics.mean_attention_distance(probs[None, None], d[unit])[0]
    assert mean("time_patches") == pytest.approx(3 * share)
    assert mean("time_ms") == pytest.approx(120.0 * share)
    assert mean("freq_patches") == pytest.approx(3 * share)
    assert mean("freq_mel_bins") == pytest.approx(48 * share)
    assert mean("patches") == pytest.approx(math.sqrt(18) * share)
    centres = grid.band_centres_hz
    hz = sum(abs(centres[ff + 3] - centres[ff]) for ff in (0, 1)) * 2 / n
    assert mean("freq_hz") == pytest.approx(hz)


def test_mel_centres_are_the_front_ends_filter_peaks():
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.02)  # the HTK anchor, nearly
    centres = mel_bin_centres_hz(audio.N_MELS, audio.F_MIN, audio.F_MAX)
    # Triangles rising from the previous centre to 1 at this one, falling to the next,
    # rebuilt from these centres alone, are the front end's filterbank.
    edges = np.concatenate([[audio.F_MIN], centres, [audio.F_MAX]])
    freqs = np.linspace(0, audio.SAMPLE_RATE / 2, audio.N_FFT // 2 + 1)[:, None]
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    rebuilt = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    np.testing.assert_allclose(rebuilt, audio.mel_filterbank(), atol=1e-4)
    bands = band_centres_hz(80, 50.0, 8000.0, 16)
    assert bands.shape == (5,) and np.all(np.diff(bands) > 0)
    # Band 0's centre lies between its 8th and 9th filter centres (equal spacing in mel).
    assert centres[7] < bands[0] < centres[8]


def test_grid_refuses_a_front_end_that_is_not_the_models():
    with pytest.raises(ValueError, match="64 mel bins"):
        PatchGrid.from_config(TINY, {**front_end(), "n_mels": 64})


# ---- CKA -------------------------------------------------------------------------------------

def gram_cka(x, y):
    """Kornblith et al.'s HSIC form with linear kernels, written out."""
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)
    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def test_cka_is_one_for_the_same_features_up_to_rotation_and_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))  # correlated dims
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert metrics.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert metrics.linear_cka(x, 3.7 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-10)
    # Not invariant to any linear map: stretching one direction lowers it.
    assert metrics.linear_cka(x, x * np.array([10.0] + [1.0] * 7)) < 0.99


def test_cka_of_independent_features_is_near_zero_and_matches_the_hsic_formula():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4000, 8)), rng.normal(size=(4000, 16))
    assert metrics.linear_cka(x, y) < 0.01
    small_x, small_y = rng.normal(size=(120, 6)), rng.normal(size=(120, 4))
    small_y[:, 0] += small_x[:, 0]  # partly shared
    want = gram_cka(small_x, small_y)
    assert 0.05 < want < 0.9
    assert metrics.linear_cka(small_x, small_y) == pytest.approx(want, rel=1e-10)


def test_cka_accumulated_over_batches_equals_the_direct_matrix():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(900, 5))
    groups = [base @ rng.normal(size=(5, 4)) + rng.normal(size=(900, 4)) * s
              for s in (0.1, 1.0, 3.0)]
    feats = np.stack(groups, axis=1).astype(np.float32) + 300.0  # a large common offset
    acc = metrics.CkaAccumulator(3, 4)
    for start in range(0, 900, 250):  # uneven batches
        acc.add(feats[start:start + 250])
    assert acc.count == 900
    want = metrics.cka_matrix([feats[:, g].astype(np.float64) for g in range(3)])
    np.testing.assert_allclose(acc.matrix(), want, atol=2e-5)
    assert want[0, 1] > want[0, 2]  # the noisier group is less similar


def test_window_summary_splits_pairs_across_layers_by_window():
    m = np.array([[1, .2, .9, .1], [.2, 1, .3, .7], [.9, .3, 1, .4], [.1, .7, .4, 1]])
    s = metrics.window_cka_summary(m, layers=[0, 0, 1, 1], windows=[5, 0, 5, 0])
    assert s["same_window_other_layer"] == pytest.approx((0.9 + 0.7) / 2)
    assert s["other_window_other_layer"] == pytest.approx((0.3 + 0.1) / 2)
    assert s["pairs_same_window"] == 2 and s["pairs_other_window"] == 2


# ---- capture in the kernel and the model -----------------------------------------------------

@pytest.mark.parametrize("windows,length,shift", [((2, 5, 0, 10), 50, False),
                                                  ((5, 0, 25, 5), 50, True)])
def test_reference_probabilities_reproduce_the_output(windows, length, shift):
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(2, len(windows), length, 8)), jnp.float32)
               for _ in range(3))
    tables = jnp.asarray(rng.normal(size=(len(windows), 2 * max(windows) - 1)), jnp.float32)
    out, probs = multi_window_attention_with_probs(q, k, v, windows, tables, shift)
    plain = multi_window_attention(q, k, v, windows, tables, shift, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    np.testing.assert_allclose(np.asarray(jnp.einsum("bhqk,bhkd->bhqd", probs, v)),
                               np.asarray(out), atol=1e-5)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_params():
    return params_of(TINY, 0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(4)
    return (jnp.asarray(rng.normal(size=(2, 200, 80, 1)), jnp.float32),
            jnp.asarray(rng.uniform(size=(2, 250)), jnp.float32))


def test_capture_leaves_the_outputs_unchanged(tiny_params, batch):
    x, noise = batch
    enc = {k: tiny_params[k] for k in ("patch_embed", "pos_embed", "encoder", "encoder_norm")}
    plain = jax.jit(lambda p, x: Encoder(TINY).apply({"params": p}, x))(enc, x)
    captured, state = jax.jit(lambda p, x: Encoder(TINY, capture_attention=True).apply(
        {"params": p}, x, mutable=["intermediates"]))(enc, x)
    np.testing.assert_array_equal(np.asarray(captured), np.asarray(plain))
    probs = state["intermediates"]["encoder"]["layers"]["block_0"]["attn"]["attention"][0]
    assert probs.shape == (2, 2, 4, 250, 250)  # (layers, B, heads, N, N): all patches
    mae = lambda model: jax.jit(lambda p, x, n: model.apply({"params": p}, x, n,
                                                            mutable=["intermediates"]))
    rec, empty = mae(MaskedAutoencoder(TINY))(tiny_params, x, noise)
    rec_c, sown = mae(MaskedAutoencoder(TINY, capture_attention=True))(tiny_params, x, noise)
    np.testing.assert_array_equal(np.asarray(rec_c.pred), np.asarray(rec.pred))
    assert set(sown["intermediates"]) == {"encoder", "decoder"}
    assert not empty.get("intermediates")  # off by default: nothing is sown


def test_decoder_capture_rows_sum_to_one_and_windows_hold_all_the_mass(tiny_params, batch):
    x, noise = batch
    out = jax.device_get(capture.decoder_pass(TINY)(tiny_params, x, noise))
    probs = out["attention"]
    assert probs.shape == (2, 2, 4, 250, 250) and out["head_outputs"].shape == (2, 2, 250, 4, 16)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    block = np.arange(250)
    for head, w in enumerate(TINY.decoder_window_sizes):
        p = probs[:, :, head]
        if w:
            outside = (block[:, None] // w) != (block[None, :] // w)
            assert np.all(p[..., outside] == 0.0), (head, w)
            assert np.all(p[..., ~outside] > 0.0)
        else:
            assert np.all(p > 0.0)  # global heads reach every token
    assert float(out["mask"].sum()) == 2 * 200  # 80% of 250 masked per clip


def test_shifted_layers_come_out_in_layer_order():
    config = TINY.replace(shifting_windows=True)  # blocks alternate: layer 1 shifts
    params = params_of(config, 1)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 200, 80, 1)), jnp.float32)
    noise = jnp.linspace(0, 1, 250)[None]
    probs = np.asarray(capture.decoder_pass(config)(params, x, noise)["attention"])
    w5 = probs[:, 0, 0]  # head 0, window 5: tokens 4 and 5 share a window only when shifted
    assert w5[0, 4, 5] == 0.0 and w5[1, 4, 5] > 0.0
    assert w5[0, 3, 4] > 0.0 and w5[1, 1, 2] == 0.0


def test_a_class_token_is_left_out_and_patch_rows_renormalised():
    config = TINY.replace(use_cls_token=True, decoder_window_sizes=(0, 0, 0, 0))
    params = params_of(config, 2)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 200, 80, 1)), jnp.float32)
    out = jax.device_get(capture.encoder_pass(config)(params, x))
    assert out["attention"].shape == (2, 1, 4, 250, 250)
    assert out["head_outputs"].shape == (2, 1, 250, 4, 16)
    np.testing.assert_allclose(out["attention"].sum(-1), 1.0, atol=1e-5)


# ---- the CLI ---------------------------------------------------------------------------------

def write_shards(folder: pathlib.Path, clips: int, frames: int = 230) -> str:
    """Two TFRecord shards of random log-mel clips and their manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    rows = ["shard,num_records"]
    for s, count in enumerate((clips - clips // 2, clips // 2)):
        name = f"clips-{s}.tfrecord"
        with open(folder / name, "wb") as f:
            w = records.TFRecordWriter(f)
            for k in range(count):
                w.write(records.encode_example(
                    rng.normal(size=(frames, 80)).astype(np.float32), [k]))
            w.close()
        rows.append(f"{name},{count}")
    (folder / "clips-manifest.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "clips-manifest.csv")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_params):
    root = tmp_path_factory.mktemp("analysis")
    config = ModelConfig(**TINY_MODEL)  # attention "auto", as exported
    params = jax.device_get(tiny_params)
    return {"full": str(save_artifact(root / "full", config, params)),
            "encoder": str(save_artifact(root / "enc", config, params, encoder_only=True)),
            "shards": write_shards(root / "shards", 10),
            "root": root}


def test_cli_writes_every_layer_and_head_and_the_figures(artifacts, tmp_path):
    out = tmp_path / "out"
    # 10 clips in batches of 4: the last batch is partial.
    r = subprocess.run([sys.executable, "-m", "mwmae.analysis", "--artifact",
                        artifacts["full"], "--shards", artifacts["shards"], "--out", str(out),
                        "--clips", "10", "--batch", "4"],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "analysis.json").read_text())
    assert report["clips"] == 10 and report["grid"]["ms_per_patch"] == 40.0
    for part, windows in (("encoder", TINY.window_sizes),
                          ("decoder", TINY.decoder_window_sizes)):
        got = report["parts"][part]
        assert [layer["layer"] for layer in got["layers"]] == [0, 1]
        for layer in got["layers"]:
            assert [h["window"] for h in layer["heads"]] == list(windows)
            for h in layer["heads"]:
                values = [v for k, v in h.items() if k.startswith(("distance", "entropy"))]
                assert len(values) == 7 and all(math.isfinite(v) and v >= 0 for v in values)
                assert h["entropy_nats"] <= math.log(h["window"] or 250) + 1e-6
        matrix = np.array(got["cka"]["matrix"], dtype=float)
        assert matrix.shape == (8, 8) and np.all(np.isfinite(matrix))
        np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
        assert [row["window"] for row in got["cka"]["rows"]] == list(windows) * 2
        assert got["cka"]["samples"] == 10 * 250
    windowed = report["parts"]["decoder"]["layers"][0]["heads"][0]  # w = 5: one time patch
    assert windowed["distance_time_patches"] == 0.0 and windowed["entropy_nats"] <= math.log(5)
    assert report["parts"]["decoder"]["masked_fraction"] == pytest.approx(0.8)
    for name in ("distance.png", "entropy.png", "cka_encoder.png", "cka_decoder.png"):
        data = (out / name).read_bytes()
        assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n", name


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_refuses_the_decoder_of_an_encoder_only_artifact(artifacts, tmp_path, capsys):
    rc = analysis_cli.main(["--artifact", artifacts["encoder"], "--shards",
                            artifacts["shards"], "--out", str(tmp_path / "o"),
                            "--part", "decoder"])
    line = last_error(capsys)
    assert rc == 2
    assert line.startswith("error: ") and "config.json: an encoder-only artifact" in line
    assert "--workdir" in line and "--part encoder" in line
    assert not (tmp_path / "o").exists()
    # With no --part it analyses what the weights have, and says so.
    rc = analysis_cli.main(["--artifact", artifacts["encoder"], "--shards",
                            artifacts["shards"], "--out", str(tmp_path / "o"), "--clips", "4",
                            "--batch", "4"])
    assert rc == 0 and "no decoder; analysing the encoder" in capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "analysis.json").read_text())
    assert list(report["parts"]) == ["encoder"]


def test_cli_names_missing_shards_and_short_clips(artifacts, tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "m-manifest.csv")
    rc = analysis_cli.main(["--artifact", artifacts["full"], "--shards", missing,
                            "--out", str(tmp_path / "o")])
    assert rc == 2 and missing in last_error(capsys)
    short = write_shards(tmp_path / "short", 2, frames=120)
    rc = analysis_cli.main(["--artifact", artifacts["full"], "--shards", short,
                            "--out", str(tmp_path / "o"), "--part", "encoder"])
    line = last_error(capsys)
    assert rc == 2 and "clips-0.tfrecord: record 0 has 120 frames" in line
    assert "200 frames" in line
    rc = analysis_cli.main(["--artifact", str(tmp_path / "no-artifact"), "--shards", short,
                            "--out", str(tmp_path / "o")])
    assert rc == 2 and "no-artifact: no such directory" in last_error(capsys)


def test_cli_reads_a_workdir_step(artifacts, tiny_params, tmp_path, capsys):
    wd = Workdir(tmp_path / "run")
    wd.write_config(json.dumps({"model": TINY.replace(attention_impl="auto").to_dict(),
                                "seed": 0}))
    manager = wd.manager()
    for step in (2, 4):
        wd.save(manager, step, {"params": tiny_params}, [{}], {"step": step}, force=True)
    manager.wait_until_finished()
    manager.close()
    out = tmp_path / "out"
    rc = analysis_cli.main(["--workdir", str(wd), "--step", "2", "--shards",
                            artifacts["shards"], "--out", str(out), "--clips", "4",
                            "--batch", "4", "--part", "decoder"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "analysis.json").read_text())
    assert report["step"] == 2 and list(report["parts"]) == ["decoder"]
    assert (out / "cka_decoder.png").stat().st_size > 0
    rc = analysis_cli.main(["--workdir", str(wd), "--step", "3", "--shards",
                            artifacts["shards"], "--out", str(out)])
    assert rc == 2 and "no checkpoint for step 3" in last_error(capsys)


def test_original_released_checkpoints_load_with_their_decoder(original_checkpoint):
    from mwmae.analysis import weights

    w = weights.from_artifact(str(original_checkpoint))
    assert w.has_decoder and w.config.embed_dim == 192 and w.step is None
    assert w.front_end["hop_length"] == 160
    assert PatchGrid.from_config(w.config, w.front_end).num_tokens == 250


# ---- careless use: outputs over inputs, reruns, concurrent writers, odd numbers ---------------

def test_out_inside_the_weights_it_reads_is_refused(artifacts, tiny_params, tmp_path, capsys):
    import shutil

    art = shutil.copytree(artifacts["encoder"], tmp_path / "art")
    before = sorted(p.name for p in art.iterdir())
    for out in (art, art / "analysis"):
        rc = analysis_cli.main(["--artifact", str(art), "--shards", artifacts["shards"],
                                "--out", str(out), "--clips", "4", "--batch", "4"])
        assert rc == 2
        assert last_error(capsys) == (f"error: --out {out} is inside --artifact {art}: the "
                                      "analysis would write into what it reads; give another "
                                      "folder")
    assert sorted(p.name for p in art.iterdir()) == before
    wd = Workdir(tmp_path / "run")
    wd.write_config(json.dumps({"model": TINY.replace(attention_impl="auto").to_dict(),
                                "seed": 0}))
    rc = analysis_cli.main(["--workdir", str(wd.path), "--shards", artifacts["shards"],
                            "--out", str(wd.path / "analysis")])
    assert rc == 2 and "is inside --workdir" in last_error(capsys)


def test_a_rerun_into_the_same_out_leaves_no_figure_of_the_earlier_one(artifacts, tmp_path,
                                                                       capsys):
    out = tmp_path / "out"
    args = ["--artifact", artifacts["full"], "--shards", artifacts["shards"], "--out", str(out),
            "--clips", "4", "--batch", "4"]
    assert analysis_cli.main([*args, "--part", "both"]) == 0
    assert (out / "cka_decoder.png").exists()
    (out / "notes.txt").write_text("mine")     # not the analysis' own: left alone
    assert analysis_cli.main([*args, "--part", "encoder"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "analysis.json", "cka_encoder.png", "distance.png", "entropy.png", "notes.txt"]
    assert list(json.loads((out / "analysis.json").read_text())["parts"]) == ["encoder"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".analysis-lock"]


def test_two_analyses_never_write_one_out_at_once(artifacts, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".analysis-lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc = analysis_cli.main(["--artifact", artifacts["encoder"], "--shards",
                                artifacts["shards"], "--out", str(out), "--clips", "4",
                                "--batch", "4"])
    assert rc == 2
    assert last_error(capsys) == (f"error: --out {out}: another analysis is writing there now; "
                                  "wait for it or give another folder")
    assert not (out / "analysis.json").exists()


def test_a_seed_the_masks_cannot_take_is_refused_before_any_work(artifacts, tmp_path, capsys):
    for seed in (str(2**64), str(-2**63 - 1)):
        with pytest.raises(SystemExit) as e:
            analysis_cli.main(["--artifact", artifacts["full"], "--shards", artifacts["shards"],
                               "--out", str(tmp_path / "o"), "--seed", seed])
        assert e.value.code == 2
        assert last_error(capsys).endswith(f"--seed {seed}: must lie in [-2**63, 2**63)")
    assert not (tmp_path / "o").exists()
