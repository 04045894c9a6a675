"""The tagger as a task of the trainer: fine-tuning and probes on labelled shards, whole-clip
evaluation over the split, the best checkpoint beside the latest, init_from, and its refusals."""

import math

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from tag_helpers import CLASSES, FRAMES, tiny_tag_config, write_split

import mwmae
from mwmae import goodput
from mwmae.data import records
from mwmae.export import export_workdir
from mwmae.finetune import metrics as metrics_lib
from mwmae.finetune.config import tag_config
from mwmae.finetune.evaluate import EvalSplit, evaluate
from mwmae.finetune.tagging import Tagging
from mwmae.model import encoder_keys
from mwmae.train.config import ConfigError, check_config
from mwmae.train.engine import Engine
from mwmae.train.loop import train
from mwmae.workdir import Workdir


def flat(params):
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(params)).items()}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    d = tmp_path_factory.mktemp("tag-data")
    return {"train": write_split(d, "train", 48, seed=0),
            "eval": write_split(d, "eval", 18, seed=1),
            "multi_train": write_split(d, "mtrain", 48, seed=2, multilabel=True),
            "multi_eval": write_split(d, "meval", 18, seed=3, multilabel=True)}


def fast(c):
    c.optimizer.base_learning_rate = 3e-2 * 256 / c.batch_size
    return c


@pytest.mark.slow  # an integration run over 30 s: it runs in CI's slow group
def test_a_tagger_learns_evaluates_and_keeps_the_best_beside_the_latest(splits, tmp_path):
    c = fast(tiny_tag_config(splits["train"], splits["eval"], steps=16))
    printed = []
    result = train(Tagging, c, tmp_path / "wd", print_fn=printed.append)
    assert result["status"] == "done"
    wd = Workdir(tmp_path / "wd")
    rows = wd.read_evaluations()
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    assert all(r["clips"] == 18 for r in rows)
    assert rows[-1]["top1"] > 1 / len(CLASSES) + 0.3, rows   # a band per class: learnable
    best = max(rows, key=lambda r: (r["top1"], r["step"]))["step"]  # ties: the later
    assert wd.steps() == sorted({best, 16})        # keep_last=1, plus the best
    assert wd.read_meta(best)["evaluation"] == {"top1": max(r["top1"] for r in rows)}
    assert any(line.startswith("eval     16/16  top1") for line in printed), printed
    # The goodput ledger times the evaluation hook, around the evaluation's own clock.
    ledger = goodput.summarise_rows(*wd.read_goodput())
    assert ledger.seconds["evaluation"] >= sum(r["eval_seconds"] for r in rows) > 0
    # The fine-tuned encoder exports, and equals the checkpoint's encoder entries.
    export_workdir(tmp_path / "wd", str(tmp_path / "art"))
    art = mwmae.load(tmp_path / "art")
    _, params, _ = wd.read_params()
    assert flat(art.params).keys() == flat(params).keys()
    for k, v in flat(params).items():
        np.testing.assert_array_equal(flat(art.params)[k], v, err_msg=k)
    assert mwmae.load(tmp_path / "wd").config == art.config   # a tagger workdir loads too


@pytest.mark.slow  # two trainings
def test_a_multilabel_probe_never_moves_the_encoder(splits, tmp_path):
    # First a short fine-tuning run whose workdir is the probe's init_from.
    c = fast(tiny_tag_config(splits["multi_train"], splits["multi_eval"], task="multilabel",
                             steps=4))
    train(Tagging, c, tmp_path / "src", print_fn=lambda s: None)
    p = fast(tiny_tag_config(splits["multi_train"], splits["multi_eval"], task="multilabel",
                             steps=8))
    p.init_from, p.tagger.freeze_encoder = str(tmp_path / "src"), True
    train(Tagging, p, tmp_path / "probe", print_fn=lambda s: None)
    _, start, _ = Workdir(tmp_path / "src").read_params()
    _, end, _ = Workdir(tmp_path / "probe").read_params()
    for k, v in flat(start).items():
        np.testing.assert_array_equal(flat(end)[k], v, err_msg=k)
    rows = Workdir(tmp_path / "probe").read_evaluations()
    assert {"mAP", "mAUC", "d_prime", "classes_scored"} <= set(rows[-1])
    assert rows[-1]["classes_scored"] == len(CLASSES)


def test_the_evaluation_scores_every_clip_by_its_frame_weighted_windows(splits):
    split = EvalSplit(splits["multi_eval"], frames=FRAMES, n_mels=80, max_labels=32,
                      batch_size=8, num_classes=len(CLASSES))
    w = np.random.default_rng(0).normal(size=(FRAMES * 80, len(CLASSES)))
    predict = lambda x: x.reshape(x.shape[0], -1) @ w  # noqa: E731 - a linear "model"
    got = evaluate(split, predict, "multilabel")

    # By hand: every record, normalised whole, cut into windows, logits weighted by frames.
    from mwmae.data import shards
    from mwmae.data.clips import prepare_audio

    scores, hot = [], []
    for shard in shards.resolve(splits["multi_eval"]):
        for record in shards.iter_records(shard):
            logmel, labels = records.decode_example(record)
            t = logmel.shape[0]
            n = math.ceil(t / FRAMES)
            x = prepare_audio(logmel, crop_frames=n * FRAMES, n_mels=80, crop=None)
            windows = x.reshape(n, FRAMES, 80, 1)
            weights = [min(FRAMES, t - i * FRAMES) / t for i in range(n)]
            scores.append(sum(wt * predict(windows[i:i + 1])[0]
                              for i, wt in enumerate(weights)))
            hot.append(np.isin(np.arange(len(CLASSES)), labels).astype(np.float32))
    want = metrics_lib.multilabel(np.array(hot), np.array(scores))
    assert got["clips"] == 18 and split.batches >= math.ceil(18 * 2 / 8)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k


def test_init_from_the_released_checkpoint_gives_its_encoder_features(
        reference_model, original_checkpoint, fixtures, splits, tmp_path):
    c = tiny_tag_config(splits["train"], "")
    c.model.update({k: tuple(v) if isinstance(v, list) else v
                    for k, v in reference_model.config.to_dict().items()})
    c.init_from = str(original_checkpoint)
    t = Engine(Tagging(c), tmp_path / "wd", devices=jax.devices()[:2])
    params = jax.device_get(t.initial_state().params)
    assert set(params) == set(encoder_keys(reference_model.config)) | {"head"}
    encoder = {k: params[k] for k in encoder_keys(reference_model.config)}
    started = mwmae.api.Model(reference_model.config, encoder)
    np.testing.assert_array_equal(np.asarray(started.features(fixtures["input"])),
                                  np.asarray(reference_model.features(fixtures["input"])))


def test_careless_configs_are_refused_with_the_reason(splits, tmp_path):
    c = tiny_tag_config(splits["train"], splits["eval"])
    c.tagger.task = "multi-label"
    with pytest.raises(ConfigError, match="tagger.task='multi-label': must be one of"):
        Engine(Tagging(c), tmp_path / "a")
    c = tiny_tag_config(str(tmp_path / "nowhere" / "*.tfrecord"), "")
    with pytest.raises(ConfigError, match="not a manifest.*tagger.num_classes"):
        Engine(Tagging(c), tmp_path / "b")
    c = tiny_tag_config(splits["train"], "")
    c.data.balanced_sampling = True   # the helper writes no clip-labels table
    with pytest.raises(ConfigError, match="train-clip-labels.csv: missing; data.balanced_samp"):
        Tagging(c).make_source()
    # Synthetic clips have no labels; a tagger's config is not pretraining's.
    c = tag_config()
    c.data.source = "synthetic"
    with pytest.raises(ConfigError, match="a tagger trains on labelled shards"):
        Tagging(c)
    c = tiny_tag_config(splits["train"], "")
    c.image_every_steps = 100  # a pretraining key with nothing to do here: said, not ignored
    with pytest.raises(ConfigError, match="image_every_steps=100: a tagger has no decoder"):
        Tagging(c)
    with pytest.raises(ConfigError, match="runs with python -m mwmae.finetune"):
        check_config(tiny_tag_config(splits["train"], ""))


def test_an_evaluation_split_of_other_classes_is_refused(splits, tmp_path):
    d = tmp_path / "other"
    manifest = write_split(d, "eval", 6, seed=4)
    (d / "eval-labels.csv").write_text("index,label\n0,low\n1,high\n2,mid\n")
    c = tiny_tag_config(splits["train"], manifest)
    with pytest.raises(ConfigError, match="index 1 is 'high' there, 'mid' here"):
        Engine(Tagging(c), tmp_path / "wd")
    # A record whose label the run does not have names the file and record.
    (d / "eval-labels.csv").unlink()
    shard = d / "eval-00000.tfrecord"
    with open(shard, "wb") as f:
        w = records.TFRecordWriter(f)
        w.write(records.encode_example(np.zeros((50, 80), np.float32), [7]))
        w.close()
    (d / "eval-manifest.csv").write_text("shard,num_records\neval-00000.tfrecord,1\n")
    with pytest.raises(records.RecordError, match=r"eval-00000.tfrecord: record 0: label ids "
                                                  r"\[7\] outside \[0, 3\)"):
        EvalSplit(str(d / "eval-manifest.csv"), frames=FRAMES, n_mels=80, max_labels=32,
                  batch_size=8, num_classes=3)


def test_the_best_checkpoint_is_kept_beside_the_latest_across_restarts(tmp_path):
    from mwmae.train import checkpoint as ckpt

    config = tiny_tag_config("unused", "")
    wd = Workdir(tmp_path / "wd")

    def save(manager, step, top1):
        state = {"x": jax.numpy.full((3,), float(step))}
        ckpt.save_checkpoint(wd, manager, step, state, {"position": step}, {"step": step},
                             force=True, metrics=None if top1 is None else {"top1": top1})
        manager.wait_until_finished()

    manager = ckpt.make_manager(wd, config, best_metric="top1")
    for step, top1 in ((1, 0.5), (2, 0.9), (3, 0.3), (4, None)):
        save(manager, step, top1)
    assert wd.steps() == [2, 4]            # the best (0.9) and the latest (keep_last=1)
    manager.close()
    # A restarted run's manager reads the kept metrics back: step 2 stays until beaten.
    manager = ckpt.make_manager(wd, config, best_metric="top1")
    save(manager, 5, 0.8)
    assert wd.steps() == [2, 5]
    save(manager, 6, 0.95)
    assert wd.steps() == [6]
    manager.close()


def _finetune_cmd(workdir, art, splits, steps):
    import sys

    from train_helpers import REPO

    return [sys.executable, "-m", "mwmae.finetune", "--config", f"{REPO}/configs/tag.py:demo",
            "--workdir", str(workdir), f"--config.init_from={art}",
            f"--config.model.img_size=({FRAMES}, 80)", "--config.batch_size=8",
            f"--config.num_train_steps={steps}", "--config.steps_per_epoch=6",
            f"--config.data.train_shards={splits['train']}",
            f"--config.tagger.eval_shards={splits['eval']}", "--config.tagger.eval_every_steps=8",
            "--config.tagger.eval_batch_size=8", "--config.tagger.mixup_alpha=0.3",
            "--config.tagger.drop_path=0.1", "--config.tagger.dropout=0.1",
            "--config.checkpoint.every_steps=8", "--config.log_every_steps=1",
            "--config.trace_batches=True", "--config.lease_seconds=5"]


@pytest.mark.slow  # three trainer processes, one killed
def test_fine_tuning_from_an_artifact_resumes_identically_after_kill_9(splits, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from multihost_helpers import read_trace

    from mwmae.artifact import save_artifact
    from mwmae.model import init_params
    from mwmae.train.config import TINY_MODEL

    config = mwmae.ModelConfig(**{**TINY_MODEL, "img_size": (FRAMES, 80)})
    art = tmp_path / "pretrained"
    save_artifact(str(art), config, jax.device_get(init_params(config, jax.random.key(3))),
                  source="test", encoder_only=True)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONUNBUFFERED": "1"}
    steps = 40
    whole = subprocess.run(_finetune_cmd(tmp_path / "a", art, splits, steps), env=env,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    proc = subprocess.Popen(_finetune_cmd(tmp_path / "b", art, splits, steps), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            # Past the step-8 evaluation; killed once its (asynchronous) save has committed.
            if line.startswith("step    13/"):
                break
        deadline = time.monotonic() + 120
        while not Workdir(tmp_path / "b").steps() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    kept = Workdir(tmp_path / "b").steps()
    assert kept and kept[-1] < steps, kept
    again = subprocess.run(_finetune_cmd(tmp_path / "b", art, splits, steps), env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {kept[-1]}" in again.stdout + again.stderr

    # Every step saw the same clips and computed the same loss, bit for bit; every evaluation
    # came out the same.
    a, b = read_trace(tmp_path / "a", 0), read_trace(tmp_path / "b", 0)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(a[s] == b[s] for s in a), [s for s in a if a[s] != b[s]]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "eval_seconds"}  # noqa: E731
                         for r in rows]
    ra, rb = Workdir(tmp_path / "a").read_evaluations(), Workdir(tmp_path / "b").read_evaluations()
    assert [r["step"] for r in ra] == [8, 16, 24, 32, 40] and drop(ra) == drop(rb)

    # The fine-tuned encoder exports through the usual command and differs from the start.
    r = subprocess.run([os.sys.executable, "-m", "mwmae.export", "--workdir", str(tmp_path / "b"),
                        "--out", str(tmp_path / "tuned")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    tuned, start = flat(mwmae.load(tmp_path / "tuned").params), flat(mwmae.load(art).params)
    assert tuned.keys() == start.keys()
    assert any(not np.array_equal(tuned[k], start[k]) for k in start)
    _, final_a, _ = Workdir(tmp_path / "a").read_params()
    for k, v in flat(final_a).items():
        np.testing.assert_array_equal(tuned[k], v, err_msg=k)


@pytest.mark.slow  # three tagger processes
def test_two_hosts_evaluate_the_whole_split_to_the_same_bits_as_one(splits, tmp_path):
    """Uneven shards (8, 8 and 2 clips: 10 on host 0, 8 on host 1); lr 0 keeps the weights at
    their (seeded) start, so both runs evaluate the same network."""
    from multihost_helpers import launch, wait_all

    from mwmae.artifact import save_artifact
    from mwmae.model import init_params
    from mwmae.train.config import TINY_MODEL

    config = mwmae.ModelConfig(**{**TINY_MODEL, "img_size": (FRAMES, 80)})
    art = tmp_path / "pretrained"
    save_artifact(str(art), config, jax.device_get(init_params(config, jax.random.key(5))),
                  source="test", encoder_only=True)
    args = [a for a in _finetune_cmd("unused", art, splits, 4)[7:]  # after --workdir DIR
            if not a.startswith(("--config.trace_batches", "--config.tagger.eval_every"))]
    args += ["--config.optimizer.base_learning_rate=0.0", "--config.tagger.eval_every_steps=2"]
    rows = {}
    for hosts in (1, 2):
        wd = tmp_path / f"hosts{hosts}"
        assert wait_all(launch(wd, args, num_processes=hosts, devices_per_process=2,
                               module="mwmae.finetune", config="configs/tag.py:demo"),
                        timeout=600) == [0] * hosts, (tmp_path / f"{wd.name}-host0.log"
                                                      ).read_text()[-3000:]
        rows[hosts] = [{k: v for k, v in r.items() if k != "eval_seconds"}
                       for r in Workdir(wd).read_evaluations()]
    assert [r["step"] for r in rows[1]] == [2, 4] and all(r["clips"] == 18 for r in rows[1])
    assert rows[1] == rows[2]


def test_gradient_accumulation_equals_one_step_of_the_whole_batch(splits, tmp_path):
    """grad_accum_steps=2 over a batch of 8 takes the step that 8 clips at once take: the
    augmentation (mixup, masks) is drawn for the whole batch before it is split, and the mean
    of the two microbatches' mean losses is the batch's. Dropout is off: each microbatch draws
    its own."""
    c = tiny_tag_config(splits["train"], "")
    c.tagger.update(drop_path=0.0, dropout=0.0, mixup_alpha=0.4, time_masks=1,
                    time_mask_frames=5)
    c.optimizer.warmup_epochs = 0.0  # a step at learning rate 0 would prove nothing
    c.optimizer.base_learning_rate = 0.1
    rng = np.random.default_rng(0)
    audio = rng.normal(size=(8, FRAMES, 80, 1)).astype(np.float32)
    labels = np.full((8, 32), -1, np.int32)
    labels[:, 0] = np.arange(8) % len(CLASSES)
    got = {}
    for k in (1, 2):
        c.grad_accum_steps = k
        t = Engine(Tagging(c), tmp_path / f"k{k}", devices=jax.devices()[:2])
        state = t.initial_state()
        step = t.compile(state)
        for _ in range(2):  # the second step also sees the first one's optimizer moments
            state, m = step(state, t.global_batch(audio, labels))
        got[k] = (float(m["loss"]), float(m["grad_norm"]), flat(state.params))
    assert got[2][0] == pytest.approx(got[1][0], rel=1e-5)
    assert got[2][1] == pytest.approx(got[1][1], rel=1e-4)
    for name, value in got[1][2].items():
        np.testing.assert_allclose(got[2][2][name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    moved = max(float(np.abs(got[2][2][n] - v).max()) for n, v in flat(
        Engine(Tagging(c), tmp_path / "fresh", devices=jax.devices()[:2]).initial_state().params
    ).items())
    assert moved > 1e-4  # the step did change the weights: the comparison is not vacuous
