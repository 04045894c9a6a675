"""The tagger with careless input: evaluation splits that cannot prove their classes, the best
checkpoint named as Orbax keeps it, damaged side files and odd numbers. Each refusal is one line
naming the file or key, before the workdir holds anything."""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest
from tag_helpers import tiny_tag_config, write_split

from mwmae.data import records
from mwmae.finetune.tagging import Tagging
from mwmae.train import checkpoint as ckpt
from mwmae.train.config import ConfigError
from mwmae.train.engine import Engine
from mwmae.train.loop import train
from mwmae.workdir import Workdir, WorkdirError


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    d = tmp_path_factory.mktemp("tag-safety")
    return {"dir": d, "train": write_split(d, "train", 24, seed=0),
            "eval": write_split(d, "eval", 9, seed=1)}


def _copy_split(src_manifest: str, dest, *, labels: bool):
    """The split's shards and manifest in ``dest``; its labels CSV only with ``labels``."""
    prefix = src_manifest[: -len("-manifest.csv")]
    dest.mkdir(parents=True, exist_ok=True)
    src = os.path.dirname(src_manifest)
    name = os.path.basename(prefix)
    for path in sorted(os.listdir(src)):
        if path.startswith(name + "-") and (labels or not path.endswith("-labels.csv")):
            shutil.copy(os.path.join(src, path), dest / path)
    return str(dest / f"{name}-manifest.csv")


def test_an_evaluation_split_without_its_labels_csv_is_refused_before_anything_is_written(
        splits, tmp_path):
    unlabelled = _copy_split(splits["eval"], tmp_path / "unlabelled", labels=False)
    c = tiny_tag_config(splits["train"], unlabelled)
    with pytest.raises(ConfigError, match=r"unlabelled/eval-labels.csv: missing; "
                                          r"tagger.eval_shards .* rebuild"):
        train(Tagging, c, tmp_path / "wd", print_fn=lambda s: None)
    assert not (tmp_path / "wd").exists()
    # A glob or a bare shard has no labels CSV to prove its classes with.
    c.tagger.eval_shards = str(tmp_path / "unlabelled" / "eval-*.tfrecord")
    with pytest.raises(ConfigError, match=r"tagger.eval_shards='.*eval-\*.tfrecord': .*"
                                          r"PREFIX-manifest.csv"):
        Engine(Tagging(c), tmp_path / "wd")
    # Nor can the run compare when its own classes come from no labels CSV.
    train_only = _copy_split(splits["train"], tmp_path / "trainonly", labels=False)
    c = tiny_tag_config(train_only, splits["eval"])
    c.tagger.num_classes = 3
    with pytest.raises(ConfigError, match=r"trainonly/train-labels.csv: missing; .*"
                                          r"tagger.labels_csv"):
        Engine(Tagging(c), tmp_path / "wd")
    # With both labels CSVs present and equal, the same split is accepted.
    Engine(Tagging(tiny_tag_config(splits["train"], splits["eval"])), tmp_path / "ok")


class _Writer:
    def write_scalars(self, step, scalars):
        pass


def _hook_run(wd: Workdir, start_step: int, printed: list):
    return types.SimpleNamespace(workdir=wd, start_step=start_step, writer=_Writer(),
                                 print_fn=printed.append,
                                 engine=types.SimpleNamespace(total_steps=10))


def _evaluating_tagger(scores: dict[int, float], split: str = "split-a"):
    """The parts of the tagging task that its evaluation hook uses, with a scripted evaluation
    (``t.scripted``) of a split whose content hashes to ``split``."""
    t = Tagging.__new__(Tagging)
    t.main_metric = "top1"
    t.config = tiny_tag_config("unused", "eval-manifest.csv")
    t._eval_split = types.SimpleNamespace(fingerprint=split)
    step = {"now": 0}
    t.scripted = lambda params: {"top1": scores[step["now"]], "clips": 9}
    return t, step


def test_the_console_names_the_checkpoint_orbax_keeps_when_evaluations_tie(tmp_path):
    scores = {1: 0.5, 2: 0.9, 3: 0.9, 4: 0.3, 5: 0.9, 6: 0.7}
    config = tiny_tag_config("unused", "")
    wd = Workdir(tmp_path / "wd")
    printed: list[str] = []

    def run_steps(steps, start_step):
        t, now = _evaluating_tagger(scores)
        run = _hook_run(wd, start_step, printed)
        hook = Tagging._evaluation_hook(t, run, t.scripted)
        manager = ckpt.make_manager(wd, config, best_metric="top1")
        for step in steps:
            now["now"] = step
            produced = hook(types.SimpleNamespace(step=step,
                                                  state=types.SimpleNamespace(params=None)))
            state = {"x": jax.numpy.full((2,), float(step))}
            ckpt.save_checkpoint(wd, manager, step, state, {"position": step}, {"step": step},
                                 force=True, metrics=produced["evaluation"])
            manager.wait_until_finished()
        manager.close()

    def console_best():
        return int(printed[-1].rsplit("at step ", 1)[1].rstrip(")"))

    run_steps([1, 2, 3, 4], start_step=0)
    kept = wd.steps()
    assert kept == [3, 4]                      # Orbax: of equal metrics, the later step
    assert console_best() == 3, printed[-1]
    # A resumed run starts from the evaluations file and ties the same way.
    run_steps([5, 6], start_step=4)
    assert wd.steps() == [5, 6]
    assert console_best() == 5, printed[-1]
    assert np.isclose(float(printed[-1].split("best ")[1].split()[0]), 0.9)


def test_a_missing_empty_or_damaged_evaluation_split_is_refused_naming_the_file(
        splits, tmp_path):
    from mwmae.finetune.evaluate import EvalSplit

    def refused(manifest, match):
        with pytest.raises(ConfigError, match=match):
            Tagging(tiny_tag_config(splits["train"], str(manifest)))
        assert not (tmp_path / "wd").exists()

    labels = (splits["dir"] / "eval-labels.csv").read_text()
    refused(tmp_path / "nowhere" / "eval-manifest.csv",
            r"tagger.eval_shards=.*nowhere/eval-manifest.csv: no such manifest")
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "eval-labels.csv").write_text(labels)
    (listed / "eval-manifest.csv").write_text("shard,num_records\neval-00000.tfrecord,4\n")
    refused(listed / "eval-manifest.csv", r"shard missing: .*listed/eval-00000.tfrecord")
    (listed / "eval-manifest.csv").write_text("shard,num_records\n")
    refused(listed / "eval-manifest.csv", r"listed/eval-manifest.csv: manifest lists no shards")

    # Damage inside the shards shows when the split is first read (before training): a
    # refusal naming the shard and record, not a traceback.
    def split(manifest):
        return EvalSplit(manifest, frames=40, n_mels=80, max_labels=32, batch_size=8,
                         num_classes=3)

    damaged = _copy_split(splits["eval"], tmp_path / "damaged", labels=True)
    shard = tmp_path / "damaged" / "eval-00000.tfrecord"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ConfigError, match=r"damaged/eval-00000.tfrecord: record \d+: "):
        split(damaged)
    for name in ("eval-00000.tfrecord", "eval-00001.tfrecord"):
        with open(tmp_path / "damaged" / name, "wb") as f:
            records.TFRecordWriter(f).close()   # a shard of no records
    with pytest.raises(ConfigError, match="the split holds no clips"):
        split(damaged)


def test_a_class_count_other_than_the_labels_csv_is_refused(splits, tmp_path):
    for wrong in (2, 5):   # too few drops classes; too many scores classes that do not exist
        c = tiny_tag_config(splits["train"], "")
        c.tagger.num_classes = wrong
        with pytest.raises(ConfigError, match=rf"tagger.num_classes={wrong}: .*train-labels.csv "
                                              r"lists 3 classes"):
            Engine(Tagging(c), tmp_path / "wd")
    c.tagger.num_classes = 3
    assert Tagging(c).num_classes == 3


def test_an_evaluation_batch_the_mesh_cannot_split_is_refused_before_the_first_step(
        splits, tmp_path):
    c = tiny_tag_config(splits["train"], splits["eval"], steps=4)
    shards = len(jax.devices())
    c.tagger.eval_batch_size = shards + 1
    with pytest.raises(ConfigError, match=rf"tagger.eval_batch_size={shards + 1}: not divisible "
                                          rf"by the {shards} batch shards"):
        train(Tagging, c, tmp_path / "wd", print_fn=lambda s: None)
    assert Workdir(tmp_path / "wd").steps() == []


def _write_rows(wd: Workdir, rows):
    wd.path.mkdir(parents=True, exist_ok=True)
    wd.evaluations_path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_resumed_run_never_ranks_evaluations_of_another_split_with_its_own(tmp_path):
    wd = Workdir(tmp_path / "wd")
    _write_rows(wd, [{"step": 4, "top1": 0.9, "clips": 9, "split": "split-a"}])
    t, _ = _evaluating_tagger({}, split="split-b")
    with pytest.raises(ConfigError, match=r"tagger.eval_shards=eval-manifest.csv: not the split "
                                          r"this workdir's evaluations .* split split-a, this one "
                                          r"is split-b\); resume with that split"):
        Tagging._evaluation_hook(t, _hook_run(wd, 4, []), t.scripted)
    # The same content (wherever it lies now) resumes.
    t, _ = _evaluating_tagger({}, split="split-a")
    Tagging._evaluation_hook(t, _hook_run(wd, 4, []), t.scripted)


def test_evaluations_after_the_restored_step_are_dropped_and_printed(tmp_path):
    wd = Workdir(tmp_path / "wd")
    _write_rows(wd, [{"step": s, "top1": v, "clips": 9, "split": "split-a"}
                     for s, v in ((4, 0.5), (8, 0.6), (12, 0.95))])
    printed = []
    t, now = _evaluating_tagger({12: 0.7}, split="split-a")
    hook = Tagging._evaluation_hook(t, _hook_run(wd, 8, printed), t.scripted)
    # Step 12's checkpoint never committed: its 0.95 is neither on disk nor the best.
    assert [r["step"] for r in wd.read_evaluations()] == [4, 8]
    assert "step 12 top1 0.95" in printed[0], printed
    now["now"] = 12
    hook(types.SimpleNamespace(step=12, state=types.SimpleNamespace(params=None)))
    assert [r["top1"] for r in wd.read_evaluations()] == [0.5, 0.6, 0.7]
    assert printed[-1].endswith("best 0.7000 at step 12)"), printed[-1]


def test_a_damaged_evaluations_file_is_refused_saying_what_to_do(tmp_path):
    wd = Workdir(tmp_path / "wd")
    wd.path.mkdir()
    wd.evaluations_path.write_text('{"step": 4, "top1": 0.5}\n{"step": 8, "top1\n')
    t, _ = _evaluating_tagger({})
    with pytest.raises(WorkdirError, match=r"evaluations.jsonl: line 2 .*; the run ranks its "
                                           r"best checkpoint by this file: repair or delete"):
        Tagging._evaluation_hook(t, _hook_run(wd, 8, []), t.scripted)
    wd.evaluations_path.write_text('{"step": 4, "mAP": 0.5}\n')
    with pytest.raises(WorkdirError, match=r"evaluation of step 4 has no top1"):
        Tagging._evaluation_hook(t, _hook_run(wd, 8, []), t.scripted)


def test_the_split_fingerprint_is_its_content_not_its_path(splits, tmp_path):
    from mwmae.finetune.evaluate import EvalSplit

    def fingerprint(manifest):
        return EvalSplit(manifest, frames=40, n_mels=80, max_labels=32, batch_size=8,
                         num_classes=3).fingerprint

    moved = _copy_split(splits["eval"], tmp_path / "moved", labels=True)
    other = write_split(tmp_path / "other", "eval", 9, seed=2)
    assert fingerprint(moved) == fingerprint(splits["eval"]) != fingerprint(other)


def test_the_split_fingerprint_is_the_same_however_many_hosts_read_it(splits, monkeypatch):
    from mwmae.finetune import evaluate

    def fingerprint():
        return evaluate.EvalSplit(splits["eval"], frames=40, n_mels=80, max_labels=32,
                                  batch_size=8, num_classes=3).fingerprint

    whole = fingerprint()
    shared = []   # what each host contributes to the last gather (the fingerprint's)
    monkeypatch.setattr(evaluate.jax, "process_count", lambda: 2)
    monkeypatch.setattr(evaluate, "_every_host", lambda v: shared.append(v) or np.array([v]))
    for host in (0, 1):
        monkeypatch.setattr(evaluate.jax, "process_index", lambda host=host: host)
        fingerprint()
    parts = np.asarray([shared[2], shared[5]], np.int64)   # third gather of each host
    assert f"{int(parts.astype(np.uint64).sum(dtype=np.uint64)):016x}" == whole
