"""The decoder-attention experiment: its statistics, and its smoke mode end to end (corpus,
shards, both tasks, both arms pretrained, exported, evaluated and analysed, then the table)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from mwmae.experiments import decoder_attention as da
from mwmae.hear import tasks


def test_intervals_are_over_the_seed_means():
    # mean 2, stdev 1, n 3: half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732
    assert da.t_interval([1.0, 2.0, 3.0]) == pytest.approx(2.4841, abs=1e-3)
    assert math.isnan(da.t_interval([1.0]))
    test = da.welch([0.70, 0.71, 0.69], [0.60, 0.61, 0.59])
    assert test["difference"] == pytest.approx(0.10)
    assert test["df"] == pytest.approx(4.0)
    assert test["ci95"] == pytest.approx(2.7764 * math.sqrt(2 * 0.0001 / 3), rel=1e-3)
    assert test["p_value"] < 0.001
    assert da.welch([0.7, 0.6, 0.65], [0.6, 0.7, 0.65])["p_value"] == pytest.approx(1.0)


@pytest.mark.slow  # ~3 min on 2 CPU cores: two pretraining runs, two evaluations, analyses
def test_the_smoke_run_makes_the_table_with_both_arms_and_tasks(tmp_path):
    cmd = [sys.executable, "-m", "mwmae.experiments.decoder_attention", "--out",
           str(tmp_path), "--smoke"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["tasks"]) == {"digits", "notes"}
    for task in results["tasks"].values():
        assert set(task["arms"]) == {"mwmae", "mae"}
        for arm in task["arms"].values():
            assert len(arm["seeds"]) == 1 and 0 <= arm["mean"] <= 1
    windows = {arm: [h["window"] for h in heads] for arm, heads in results["attention"].items()}
    assert windows["mwmae"][:4] == [5, 25, 0, 0] and set(windows["mae"]) == {0}
    table = (tmp_path / "results.md").read_text()
    assert "| digits |" in table and "| notes |" in table and "MW-MAE - MAE" in table
    assert (tmp_path / "analysis" / "mwmae" / "distance.png").exists()
    # A rerun reuses every finished stage and rewrites the same table.
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "pretrain mae seed 1 (30 steps) - done" in again.stdout
    assert "train-" not in again.stdout
    assert (tmp_path / "results.md").read_text() == table
    # Other settings in the same folder are refused, in one line naming the file.
    other = subprocess.run([*cmd[:-1], "--steps", "7"], capture_output=True, text=True)
    assert other.returncode == 1
    assert other.stderr.strip().startswith(f"error: {tmp_path / 'settings.json'}: ")


def _fake_results(tmp_path, scores):
    s = {"steps": 5, "seeds": len(scores["mwmae"]), "predictor_seeds": 2, "clips": 64,
         "task_clips": 5, "devices": 1, "smoke": False}
    for arm, seeds in scores.items():
        for seed, (digits, notes) in enumerate(seeds, 1):
            hear = tmp_path / "runs" / f"{arm}-{seed}" / "hear"
            hear.mkdir(parents=True)
            hear.joinpath("results.json").write_text(json.dumps({"tasks": {
                "mwmae_digits": {"mean": digits}, "mwmae_notes": {"mean": notes}}}))
        heads = [{"head": h, "window": w, "distance_patches": 1.0 + h, "entropy_nats": 2.0}
                 for h, w in enumerate((5, 25, 0, 0) if arm == "mwmae" else (0, 0, 0, 0))]
        analysis = tmp_path / "analysis" / arm
        analysis.mkdir(parents=True)
        analysis.joinpath("analysis.json").write_text(json.dumps(
            {"parts": {"decoder": {"layers": [{"layer": 0, "heads": heads}]}}}))
    return s


def test_the_table_is_over_pretraining_seeds(tmp_path):
    s = _fake_results(tmp_path, {"mwmae": [(0.70, 0.5), (0.72, 0.6), (0.69, 0.55)],
                                 "mae": [(0.65, 0.5), (0.66, 0.58), (0.68, 0.57)]})
    r = da.collect(tmp_path, s)
    assert r["tasks"]["digits"]["arms"]["mwmae"]["seeds"] == [0.70, 0.72, 0.69]
    assert r["tasks"]["digits"]["arms"]["mwmae"]["mean"] == pytest.approx(0.7033333)
    assert r["tasks"]["digits"]["mwmae_minus_mae"]["significant"] is True
    assert r["tasks"]["notes"]["mwmae_minus_mae"]["significant"] is False
    text = da.markdown(r)
    assert "| digits | 0.703 ± " in text and "| notes |" in text
    assert "| 0 | 0 | 5 | 1.00 | 2.00 | global | 1.00 | 2.00 |" in text


def test_a_folder_of_other_settings_and_bad_counts_are_refused(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"steps": 10}))
    with pytest.raises(da.ExperimentError, match="settings.json: this folder holds an "
                                                 "experiment with other settings"):
        da.run(tmp_path, {"steps": 20, "devices": 1})
    bad = subprocess.run([sys.executable, "-m", "mwmae.experiments.decoder_attention", "--out",
                          str(tmp_path / "x"), "--seeds", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --seeds 0: expected at least 1"


@pytest.mark.parametrize("timbre", ["organ", "string", "pluck", "fm", "reed", "voice"])
def test_every_instrument_of_the_pitch_task_plays_its_pitch(timbre):
    f0 = 261.63  # C4: its period (61 samples) is the only one in the lags searched
    note = tasks._instrument(timbre, np.random.default_rng(0), f0, tasks.SAMPLE_RATE)
    x = note[np.abs(note) > 0][:4000]
    lags = np.arange(40, 100)
    corr = [np.dot(x[:-lag], x[lag:]) for lag in lags]
    assert tasks.SAMPLE_RATE / lags[int(np.argmax(corr))] == pytest.approx(f0, rel=0.03)


def test_the_pitch_task_holds_out_timbres():
    train, valid, test = (set(tasks._SPLIT_TIMBRES[s]) for s in ("train", "valid", "test"))
    assert not train & valid and not train & test and not valid & test
