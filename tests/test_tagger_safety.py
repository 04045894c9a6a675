"""The tagger with careless input: evaluation splits that cannot prove their classes, the best
checkpoint named as Orbax keeps it, damaged side files and odd numbers. Each refusal is one line
naming the file or key, before the workdir holds anything."""

import os
import shutil
import types

import jax
import numpy as np
import pytest
from tag_helpers import tiny_tag_config, write_split

from mwmae.finetune.trainer import Tagger
from mwmae.train import checkpoint as ckpt
from mwmae.train.config import ConfigError
from mwmae.train.loop import train
from mwmae.workdir import Workdir


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
        train(c, tmp_path / "wd", print_fn=lambda s: None, task=Tagger)
    assert not (tmp_path / "wd").exists()
    # A glob or a bare shard has no labels CSV to prove its classes with.
    c.tagger.eval_shards = str(tmp_path / "unlabelled" / "eval-*.tfrecord")
    with pytest.raises(ConfigError, match=r"tagger.eval_shards='.*eval-\*.tfrecord': .*"
                                          r"PREFIX-manifest.csv"):
        Tagger(c, tmp_path / "wd")
    # Nor can the run compare when its own classes come from no labels CSV.
    train_only = _copy_split(splits["train"], tmp_path / "trainonly", labels=False)
    c = tiny_tag_config(train_only, splits["eval"])
    c.tagger.num_classes = 3
    with pytest.raises(ConfigError, match=r"trainonly/train-labels.csv: missing; .*"
                                          r"tagger.labels_csv"):
        Tagger(c, tmp_path / "wd")
    # With both labels CSVs present and equal, the same split is accepted.
    Tagger(tiny_tag_config(splits["train"], splits["eval"]), tmp_path / "ok")


class _Writer:
    def write_scalars(self, step, scalars):
        pass


def _hook_run(wd: Workdir, start_step: int, printed: list):
    return types.SimpleNamespace(workdir=wd, start_step=start_step, evaluated={},
                                 writer=_Writer(), print_fn=printed.append)


def _evaluating_tagger(scores: dict[int, float]):
    """The parts of a Tagger that its evaluation hook uses, with a scripted evaluation."""
    t = Tagger.__new__(Tagger)
    t.main_metric, t.total_steps = "top1", 10
    step = {"now": 0}
    t.evaluate = lambda params: {"top1": scores[step["now"]], "clips": 9}
    return t, step


def test_the_console_names_the_checkpoint_orbax_keeps_when_evaluations_tie(tmp_path):
    scores = {1: 0.5, 2: 0.9, 3: 0.9, 4: 0.3, 5: 0.9, 6: 0.7}
    config = tiny_tag_config("unused", "")
    wd = Workdir(tmp_path / "wd")
    printed: list[str] = []

    def run_steps(steps, start_step):
        t, now = _evaluating_tagger(scores)
        run = _hook_run(wd, start_step, printed)
        hook = Tagger._evaluation_hook(t, run)
        manager = ckpt.make_manager(wd, config, best_metric="top1")
        for step in steps:
            now["now"] = step
            hook(types.SimpleNamespace(step=step, state=types.SimpleNamespace(params=None)))
            state = {"x": jax.numpy.full((2,), float(step))}
            ckpt.save_checkpoint(wd, manager, step, state, {"position": step}, {"step": step},
                                 force=True, metrics=run.evaluated.pop(step))
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
