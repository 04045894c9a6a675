"""The evaluation driver's statistics and task preset: the 95% Student-t interval of the mean
over predictor seeds (as the paper reports HEAR scores) and HEAR 2021's task folder names."""

import math

import numpy as np
import pytest
from scipy import stats

from mwmae.hear import evaluate as ev

SCORES = [0.812, 0.797, 0.830, 0.805, 0.821, 0.799, 0.815, 0.808, 0.826, 0.811]


def test_t_interval_equals_scipys_on_fixed_numbers():
    for values in (SCORES, SCORES[:3], [0.5, 0.7]):
        lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                  scale=stats.sem(values))
        assert ev.t_interval(values) == pytest.approx((hi - lo) / 2, rel=1e-12, abs=1e-15)
    # By hand for ten seeds: t(0.975, 9) = 2.2622 (tables), times s / sqrt(10).
    s = np.std(SCORES, ddof=1)
    assert ev.t_interval(SCORES) == pytest.approx(2.262157 * s / math.sqrt(10), rel=1e-6)
    assert math.isnan(ev.t_interval([0.8]))


def test_summary_and_table_report_the_interval():
    summary = ev.summarise({"a": SCORES, "b": [0.4]}, {"a": "top1_acc", "b": "mAP"})
    assert summary["a"]["ci95"] == ev.t_interval(SCORES) and summary["a"]["n"] == 10
    table = ev.markdown_table(summary, "t")
    assert "| a | top1_acc | 0.8124 ± 0.0078 | 0.0109 | 10 |" in table, table
    assert "| b | mAP | 0.4000 ± n/a |" in table, table


def test_the_hear2021_preset_names_the_papers_ten_tasks(tmp_path, capsys):
    names = ev.PRESETS["hear2021"]
    assert len(names) == 10 and "esc50-v2.0.0-full" in names and "fsd50k-v1.0-full" in names
    (tmp_path / "art").mkdir()
    (tmp_path / "tasks").mkdir()
    args = ["--artifact", str(tmp_path / "art"), "--tasks-dir", str(tmp_path / "tasks"),
            "--out", str(tmp_path / "out")]
    assert ev.main([*args, "--preset", "hear2021", "--tasks", "x"]) == 2
    assert "give one" in capsys.readouterr().err
    assert ev.main([*args, "--preset", "hear2021"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no task(s)" in err and "beijing_opera-v1.0-hear2021-full" in err, err
