"""Tagger metrics against scikit-learn and scipy on fixed arrays."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from mwmae.finetune import metrics


def fixed_split(seed=0, clips=200, classes=12):
    rng = np.random.default_rng(seed)
    labels = (rng.random((clips, classes)) < 0.15).astype(np.int32)
    labels[:, 3] = 0             # no positive: excluded from mAP and mAUC
    labels[:, 7] = 1             # no negative: has an AP, no AUC
    labels[:5, 9], labels[5:, 9] = 1, 0
    scores = rng.normal(size=(clips, classes)) + 1.5 * labels
    scores[:, 2] = np.round(scores[:, 2])  # many ties
    scores[:, 5] = 0.25                     # all tied
    return labels, scores


def test_average_precision_and_auc_equal_scikit_learn_per_class():
    labels, scores = fixed_split()
    ap, auc = metrics.average_precision(labels, scores), metrics.roc_auc(labels, scores)
    for c in range(labels.shape[1]):
        y, s = labels[:, c], scores[:, c]
        if y.sum() == 0:
            assert math.isnan(ap[c]) and math.isnan(auc[c])
            continue
        np.testing.assert_allclose(ap[c], average_precision_score(y, s), rtol=1e-12, atol=0)
        if y.sum() == y.size:
            assert math.isnan(auc[c])
        else:
            np.testing.assert_allclose(auc[c], roc_auc_score(y, s), rtol=1e-12, atol=0)


def test_means_leave_out_classes_that_cannot_be_scored_and_d_prime_follows_the_mean_auc():
    labels, scores = fixed_split()
    got = metrics.multilabel(labels, scores)
    has_pos = labels.sum(0) > 0
    has_both = has_pos & (labels.sum(0) < labels.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_map = np.mean([average_precision_score(labels[:, c], scores[:, c])
                            for c in np.flatnonzero(has_pos)])
        want_auc = np.mean([roc_auc_score(labels[:, c], scores[:, c])
                            for c in np.flatnonzero(has_both)])
    assert got["classes_scored"] == has_pos.sum() == labels.shape[1] - 1
    np.testing.assert_allclose(got["mAP"], want_map, rtol=1e-12)
    np.testing.assert_allclose(got["mAUC"], want_auc, rtol=1e-12)
    np.testing.assert_allclose(got["d_prime"], stats.norm.ppf(want_auc) * np.sqrt(2), rtol=1e-10)


def test_perfect_and_chance_scores():
    labels = np.eye(4, dtype=np.int32)[[0, 1, 2, 3, 0, 1]]
    perfect = metrics.multilabel(labels, labels * 2.0 - 1)
    assert perfect["mAP"] == 1.0 and perfect["mAUC"] == 1.0 and math.isinf(perfect["d_prime"])
    tied = metrics.multilabel(labels, np.zeros(labels.shape))
    assert tied["mAUC"] == 0.5 and tied["d_prime"] == 0.0


def test_row_order_does_not_change_the_numbers():
    labels, scores = fixed_split(seed=1)
    perm = np.random.default_rng(2).permutation(labels.shape[0])
    a, b = metrics.multilabel(labels, scores), metrics.multilabel(labels[perm], scores[perm])
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-12)


def test_multiclass_top1_and_bad_input_errors():
    scores = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.2, 0.1]])
    assert metrics.multiclass(np.array([1, 0, 1, 0]), scores)["top1"] == 0.75
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\)"):
        metrics.multiclass(np.array([1, 0, 3, 0]), scores)
    with pytest.raises(ValueError, match="no class has a positive"):
        metrics.multilabel(np.zeros((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.multilabel(np.eye(2), np.array([[np.nan, 0], [0, 1]]))
    with pytest.raises(ValueError, match=r"\(clips, classes\)"):
        metrics.multilabel(np.eye(2), np.ones((2, 3)))


def test_metrics_are_the_same_bits_on_one_and_two_hosts(tmp_path):
    """Two local processes, each holding an uneven part of the split, gather and score it."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    import portpicker

    script = pathlib.Path(__file__).with_name("finetune_metrics_host.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(script.parents[1])}
    run = lambda port, host: subprocess.Popen(  # noqa: E731
        [sys.executable, str(script), str(port), str(host), str(tmp_path / f"{port}-{host}")],
        env=env)
    port = portpicker.pick_unused_port()
    procs = [run(0, 0), run(port, 0), run(port, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    one, *two = (json.loads((tmp_path / f"{p}-{h}").read_text())
                 for p, h in ((0, 0), (port, 0), (port, 1)))
    assert two[0]["rows"] != two[1]["rows"] and two[0]["rows"] + two[1]["rows"] == one["rows"]
    for host in two:
        assert host["ids"] == one["ids"] == list(range(one["rows"]))
        assert {k: host[k] for k in ("mAP", "mAUC", "d_prime", "classes_scored")} == {
            k: one[k] for k in ("mAP", "mAUC", "d_prime", "classes_scored")}
