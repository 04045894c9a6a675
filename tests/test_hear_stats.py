"""The evaluation driver's statistics, task presets and comparisons: the 95% Student-t
interval of the mean over predictor seeds (as the paper reports HEAR scores), HEAR 2021's task
folder names, and the overall score beside other results."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from mwmae.hear import compare
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


def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


PUBLISHED = {"source": "Someone et al., Table 1", "models": {
    "A": {"t1": {"mean": 0.90, "ci95": 0.01}, "t2": 0.50, "t3": 0.70},
    "B": {"t1": 0.80, "t2": {"mean": 0.60}},
}}


def test_overall_score_is_the_min_max_normalised_mean_over_common_tasks(tmp_path):
    run = {"name": "ours", "tasks": {"t1": {"mean": 0.85, "ci95": 0.06},
                                     "t2": {"mean": 0.55, "ci95": 0.02}}}
    this = compare.from_results(run, "results.json")
    others = compare.load(_write(tmp_path / "paper.json", PUBLISHED))
    models = [this, *others]
    assert compare.common_tasks(models) == ["t1", "t2"]
    # By hand: t1 spans 0.80..0.90, t2 0.50..0.60.
    s = compare.overall_scores(models)
    assert s["ours"] == pytest.approx(100 * (0.5 + 0.5) / 2)
    assert s["A"] == pytest.approx(100 * (1.0 + 0.0) / 2)
    assert s["B"] == pytest.approx(100 * (0.0 + 1.0) / 2)
    assert compare.mean_scores(models)["ours"] == pytest.approx(70.0)
    # A task on which all tie counts fully for each; one model alone scores 100.
    tie = compare.Model("x", {"t1": compare.Score(0.8)}, "x")
    assert compare.overall_scores([tie, others[1]], ["t1"]) == {"x": 100.0, "B": 100.0}
    text = compare.table(this, others, {"t1": "Task one"})
    assert "| Task one | 0.8500 ± 0.0600 | 0.9000 ± 0.0100 | -0.0500 | yes | 0.8000 | " \
           "+0.0500 | yes |" in text, text
    assert "| t2 | 0.5500 ± 0.0200 | 0.5000 | +0.0500 | no | 0.6000 | -0.0500 | no |" in text
    assert "| **overall score s(m)** | 50.0 | 50.0 | +0.0 | | 50.0 | +0.0 | |" in text
    assert "left out: t3" in text and "Someone et al., Table 1" in text


def test_results_files_are_checked_and_named_in_errors(tmp_path):
    with pytest.raises(compare.ComparisonError, match="missing.json: results file not found"):
        compare.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(compare.ComparisonError, match="bad.json: not a JSON results file"):
        compare.load(bad)
    pct = _write(tmp_path / "pct.json", {"models": {"A": {"t1": 96.2}}})
    with pytest.raises(compare.ComparisonError, match=r"pct.json: A / t1: mean 96.2 is outside "
                                                      r"\[0, 1\].*divided by 100"):
        compare.load(pct)
    other = _write(tmp_path / "other.json", {"rows": []})
    with pytest.raises(compare.ComparisonError, match="other.json: neither"):
        compare.load(other)
    disjoint = compare.Model("x", {"zzz": compare.Score(0.5)}, "x.json")
    with pytest.raises(compare.ComparisonError, match="no task in common"):
        compare.table(disjoint, compare.load(_write(tmp_path / "p.json", PUBLISHED)))


def test_compare_cli_prints_the_table_and_refuses_one_model(tmp_path, capsys):
    run = _write(tmp_path / "results.json", {"artifact": "/x/export", "tasks": {
        "esc50-v2.0.0-full": {"mean": 0.8, "ci95": 0.01}}})
    paper = _write(tmp_path / "paper.json", {"models": {"MAE": {"esc50-v2.0.0-full": 0.75}}})
    assert compare.main([run, paper, "--out", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    assert "| ESC-50 | 0.8000 ± 0.0100 | 0.7500 | +0.0500 | no |" in out, out
    assert (tmp_path / "t.md").read_text() in out
    assert compare.main([run]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "one model; give at least two to compare")


def test_evaluation_reads_the_files_to_compare_before_any_work(tmp_path, capsys):
    (tmp_path / "art").mkdir()
    (tmp_path / "tasks").mkdir()
    args = ["--artifact", str(tmp_path / "art"), "--tasks-dir", str(tmp_path / "tasks"),
            "--out", str(tmp_path / "out"), "--compare", str(tmp_path / "typo.json")]
    assert ev.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'typo.json'}: results file not found"
    assert not (tmp_path / "out").exists()
