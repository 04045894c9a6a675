"""A refusal happens before the first write, for every command: each command below is refused,
and the folder it was pointed at is byte for byte (and mtime for mtime) what it was, with nothing
created beside it. Commands run in-process through their entry points."""

import json
import pathlib
import shutil

import pytest
import soundfile
from numpy import arange, float32, pi, sin
from tag_helpers import tiny_tag_config, write_split
from train_helpers import checkpointing_config

from mwmae import sweep
from mwmae.finetune.tagging import Tagging
from mwmae.hear import evaluate as hear_evaluate
from mwmae.train.loop import train
from mwmae.train.pretraining import Pretraining
from mwmae.train.refusals import refusals
from tfrecord_tools import build as build_lib


def _quiet(*_):
    pass


def snapshot(root: pathlib.Path) -> dict[str, tuple]:
    """Every path under ``root`` (folders too) with, for a file, its bytes and mtime."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file()
            else ("folder",) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> pathlib.Path:
    """A finished 2-step pretraining run with one checkpoint (copied by the cases)."""
    path = tmp_path_factory.mktemp("pretrained") / "wd"
    train(Pretraining, checkpointing_config(steps=2, every=2), path, print_fn=_quiet)
    return path


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> dict:
    """A 4-step tagger run evaluated on split a, and a split b of other clips."""
    d = tmp_path_factory.mktemp("tagged")
    splits = {"train": write_split(d, "train", 24, seed=0),
              "a": write_split(d / "a", "eval", 9, seed=1),
              "b": write_split(d / "b", "eval", 9, seed=2)}
    train(Tagging, tiny_tag_config(splits["train"], splits["a"], steps=4), d / "wd",
          print_fn=_quiet)
    return {**splits, "wd": d / "wd"}


def _copy(src: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(src, tmp_path / "wd"))


# Each case: (name, setup(tmp_path, fixtures) -> (folder to watch, refused call)). The call
# raises one of the refusals or returns a non-zero exit status.

def trainer_bad_value_existing(tmp_path, fx):
    wd = _copy(fx["pretrained"], tmp_path)
    c = checkpointing_config(steps=4, every=2)
    c.model.mask_ratio = 0.999            # keeps 0 of the 250 patches
    return wd, lambda: train(Pretraining, c, wd, print_fn=_quiet)


def trainer_bad_value_new(tmp_path, fx):
    c = checkpointing_config(steps=4, every=2)
    c.model.mask_ratio = 0.999
    return tmp_path, lambda: train(Pretraining, c, tmp_path / "new", print_fn=_quiet)


def trainer_other_config_existing(tmp_path, fx):
    wd = _copy(fx["pretrained"], tmp_path)
    c = checkpointing_config(steps=4, every=2)
    c.seed = 7
    return wd, lambda: train(Pretraining, c, wd, print_fn=_quiet)


def tagger_other_eval_split(tmp_path, fx):
    t = fx["tagged"]
    wd = _copy(t["wd"], tmp_path)
    c = tiny_tag_config(t["train"], t["b"], steps=8)
    return wd, lambda: train(Tagging, c, wd, print_fn=_quiet)


def tagger_eval_batch_the_mesh_cannot_split_new(tmp_path, fx):
    import jax

    t = fx["tagged"]
    c = tiny_tag_config(t["train"], t["a"], steps=8)
    if len(jax.devices()) == 1:
        pytest.skip("one device splits every batch")
    c.tagger.eval_batch_size = len(jax.devices()) + 1
    return tmp_path, lambda: train(Tagging, c, tmp_path / "new", print_fn=_quiet)


def preflight_other_config(tmp_path, fx):
    from mwmae.preflight.run import run

    wd = _copy(fx["pretrained"], tmp_path)
    c = checkpointing_config(steps=2, every=2)
    c.seed = 7
    return wd, lambda: run(c, str(wd), None, print_fn=_quiet, remember=False)


def _tasks_dir(path: pathlib.Path) -> str:
    (path / "t").mkdir(parents=True)
    (path / "t" / "task_metadata.json").write_text("{}")
    return str(path)


def sweep_empty_key_part(tmp_path, fx):
    tasks = _tasks_dir(tmp_path / "tasks")
    parent = tmp_path / "sweeps"
    parent.mkdir()
    return parent, lambda: sweep.main(["run", "--config", "configs/tiny.py", "--workdir",
                                       str(parent / "s"), "--tasks-dir", tasks,
                                       "--sweep", "model.=.."])


def _clips(folder: pathlib.Path, count: int) -> None:
    folder.mkdir(parents=True)
    t = arange(3200) / 16000
    for i in range(count):
        soundfile.write(folder / f"c{i}.wav", (0.3 * sin(2 * pi * (150 + 31 * i) * t))
                        .astype(float32), 16000)


def builder_other_settings(tmp_path, fx):
    _clips(tmp_path / "audio", 3)
    out = tmp_path / "out"
    args = ["folder", str(tmp_path / "audio"), "--out", str(out), "--workers", "1",
            "--no-progress"]
    assert build_lib.main(args) == 0
    return out, lambda: build_lib.main([*args, "--max-seconds", "0.1"])


def hear_refused_argument(tmp_path, fx):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"tasks": {}}))
    (tmp_path / "art").mkdir()
    tasks = _tasks_dir(tmp_path / "tasks")
    return out, lambda: hear_evaluate.main(["--artifact", str(tmp_path / "art"), "--tasks-dir",
                                            tasks, "--out", str(out), "--seeds", "0"])


def _shards(folder: pathlib.Path, fmt: str, listed: int = 4) -> pathlib.Path:
    """Two shards of 4 clips each and a manifest listing ``listed`` records for the first."""
    import numpy as np

    from mwmae.data import records

    folder.mkdir(parents=True)
    rows = ["shard,num_records"]
    for s in range(2):
        payloads = [records.encode_example(np.full((100, 80), s + k / 10, np.float32), [k])
                    for k in range(4)]
        name = f"clips-{s}.{fmt}"
        if fmt == "array_record":
            from array_record.python.array_record_module import ArrayRecordWriter

            w = ArrayRecordWriter(str(folder / name), "group_size:1")
            for p in payloads:
                w.write(p)
            w.close()
        else:
            with open(folder / name, "wb") as f:
                tf = records.TFRecordWriter(f)
                for p in payloads:
                    tf.write(p)
                tf.close()
        rows.append(f"{name},{listed if s == 0 else 4}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def _on_shards(manifest: pathlib.Path):
    c = checkpointing_config(steps=2, every=2)
    c.data.source = "shards"
    c.data.train_shards = str(manifest)
    c.data.num_workers = 0
    return c


def _naming(call, *parts: str):
    """``call``, whose refusal must name every one of ``parts`` (so it is refused for the
    data, not for something else)."""
    def checked():
        try:
            return call()
        except refusals() as e:
            assert all(p in str(e) for p in parts) and "\n" not in str(e), str(e)
            raise
    return checked


def trainer_shard_with_a_damaged_header_new(tmp_path, fx):
    manifest = _shards(tmp_path / "data", "tfrecord")
    shard = tmp_path / "data" / "clips-0.tfrecord"
    data = bytearray(shard.read_bytes())
    data[2] ^= 0xFF                       # inside the first record's header
    shard.write_bytes(bytes(data))
    c = _on_shards(manifest)
    return tmp_path, _naming(lambda: train(Pretraining, c, tmp_path / "new", print_fn=_quiet),
                             str(shard), "corrupt")


def trainer_manifest_over_counting_a_shard_new(tmp_path, fx):
    manifest = _shards(tmp_path / "data", "array_record", listed=6)
    c = _on_shards(manifest)
    return tmp_path, _naming(lambda: train(Pretraining, c, tmp_path / "new", print_fn=_quiet),
                             str(tmp_path / "data" / "clips-0.array_record"), str(manifest),
                             "holds 4 records", "lists 6")


def trainer_empty_shard_new(tmp_path, fx):
    manifest = _shards(tmp_path / "data", "tfrecord")
    (tmp_path / "data" / "clips-1.tfrecord").write_bytes(b"")   # an interrupted copy
    c = _on_shards(manifest)
    return tmp_path, _naming(lambda: train(Pretraining, c, tmp_path / "new", print_fn=_quiet),
                             str(tmp_path / "data" / "clips-1.tfrecord"), "truncated")

CASES = [trainer_bad_value_existing, trainer_bad_value_new, trainer_other_config_existing,
         tagger_other_eval_split, tagger_eval_batch_the_mesh_cannot_split_new,
         preflight_other_config, sweep_empty_key_part, builder_other_settings,
         hear_refused_argument, trainer_shard_with_a_damaged_header_new,
         trainer_manifest_over_counting_a_shard_new, trainer_empty_shard_new]
NEEDS = {"pretrained": {trainer_bad_value_existing, trainer_other_config_existing,
                        preflight_other_config},
         "tagged": {tagger_other_eval_split, tagger_eval_batch_the_mesh_cannot_split_new}}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_a_refusal_leaves_the_folder_as_it_was(case, tmp_path, request, capsys):
    fx = {name: request.getfixturevalue(name) for name, cases in NEEDS.items() if case in cases}
    watched, call = case(tmp_path, fx)
    capsys.readouterr()
    before = snapshot(watched)
    try:
        status = call()
    except refusals() as e:
        status = f"refused: {e}"
    except SystemExit as e:
        status = e.code
    assert status not in (0, None), f"{case.__name__} was not refused"
    after = snapshot(watched)
    assert sorted(after) == sorted(before), (status, sorted(set(after) ^ set(before)))
    changed = [p for p in before if before[p] != after[p]]
    assert changed == [], (status, changed)
