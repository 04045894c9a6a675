"""The training loop end to end: learning, TensorBoard output, shards as input."""

import pytest
from multihost_helpers import write_id_shards
from tensorboard.backend.event_processing import event_accumulator
from train_helpers import load_config

from mwmae.train import pretraining
from mwmae.train.loop import train
from mwmae.train.pretraining import Pretraining


@pytest.mark.slow  # ~85 s: 200 steps; the demo test covers learning in the default suite
def test_200_steps_cut_the_loss_and_write_scalars_and_images(tmp_path):
    config = load_config("tiny")
    config.num_train_steps = 200
    config.steps_per_epoch = 100
    config.log_every_steps = 10
    config.image_every_steps = 100
    config.checkpoint.every_steps = 200
    lines = []
    train(Pretraining, config, tmp_path, print_fn=lines.append)
    losses = [float(line.split("loss")[1].split()[0]) for line in lines if line.startswith("step")]
    assert losses[-1] <= 0.7 * losses[0], losses     # at least a 30% drop

    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={event_accumulator.IMAGES: 0,
                                                      event_accumulator.TENSORS: 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "perf/examples_per_sec",
                "perf/mfu"):
        assert tag in tags, (tag, tags)
    loss_events = (acc.Tensors("train/loss") if "train/loss" in acc.Tags()["tensors"]
                   else acc.Scalars("train/loss"))
    assert [e.step for e in loss_events][-1] == 200
    images = acc.Tags()["tensors"] + acc.Tags()["images"]
    assert any("reconstruction" in t for t in images), images


def test_tensorboard_tag_set_hparams_and_eta(tmp_path, monkeypatch):
    config = load_config("tiny")
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.image_every_steps = 4
    config.checkpoint.every_steps = 4
    lines, checks = [], []
    check = pretraining.check_config
    monkeypatch.setattr(pretraining, "check_config", lambda *a: checks.append(1) or check(*a))
    result = train(Pretraining, config, tmp_path, print_fn=lines.append)
    assert len(checks) == 1  # the config is checked once per run
    assert result["status"] == "done" and result["loss"] > 0  # the last logged metrics
    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={event_accumulator.IMAGES: 0,
                                                      event_accumulator.TENSORS: 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])
    assert tags == {
        "train/loss", "train/grad_norm", "train/param_norm", "train/learning_rate",
        "train/skipped_steps", "perf/steps_per_sec", "perf/examples_per_sec",
        "perf/examples_per_sec_per_device", "perf/mfu", "perf/compile_seconds",
        "perf/goodput", "perf/goodput_startup", "perf/goodput_compile",
        "perf/goodput_input_wait", "perf/goodput_checkpoint", "perf/goodput_evaluation",
        "perf/goodput_recomputed",
        "data/input_wait_ms_per_step", "data/input_wait_fraction", "data/skipped_records",
        "checkpoint/save_seconds", "train/reconstruction", "_hparams_/session_start_info"}, tags
    steps = [e.step for e in acc.Tensors("train/loss")]
    assert steps == [1, 2, 4] and [e.step for e in acc.Tensors("perf/compile_seconds")] == [1]
    assert [e.step for e in acc.Tensors("checkpoint/save_seconds")] == [4]
    # At log points, and once more as the run stops (after its last save).
    assert [e.step for e in acc.Tensors("perf/goodput")] == [1, 2, 4]
    assert all(" ETA " in line for line in lines if line.startswith("step")), lines


def test_training_reads_shards_and_resumes_their_position(tmp_path):
    config = load_config("tiny")
    config.data.source = "shards"
    config.data.train_shards = write_id_shards(tmp_path / "shards", clips=64, per_shard=16)
    config.data.shuffle_buffer = 16
    config.num_train_steps = 6
    config.checkpoint.every_steps = 3
    config.image_every_steps = 0
    lines = []
    train(Pretraining, config, tmp_path / "run", print_fn=lines.append)
    assert (tmp_path / "run" / "checkpoints" / "6" / "data").exists()
    config.num_train_steps = 8
    more = []
    train(Pretraining, config, tmp_path / "run", print_fn=more.append)
    assert more[0].startswith("resumed from step 6")


def test_skipped_records_are_counted_in_the_metrics_and_checkpoints(tmp_path):
    from mwmae.workdir import Workdir

    manifest = write_id_shards(tmp_path / "shards", clips=64, per_shard=16)
    # Every shard listed one record longer than it is: each end of a shard counts one skip.
    text = (tmp_path / "shards" / "manifest.csv").read_text().replace(",16\n", ",17\n")
    (tmp_path / "shards" / "manifest.csv").write_text(text)
    config = load_config("tiny")
    config.data.source = "shards"
    config.data.train_shards = manifest
    config.data.on_error = "skip"
    config.data.shuffle_buffer = 1
    config.data.cycle_length = 1
    config.num_train_steps = 4
    config.checkpoint.every_steps = 4
    config.image_every_steps = 0
    config.checkpoint.asynchronous = False
    metrics = train(Pretraining, config, tmp_path / "run", print_fn=lambda _: None)
    assert metrics["skipped_records"] >= 1
    meta = Workdir(tmp_path / "run").read_meta(4)
    assert meta["skipped_records"] >= 1   # saved with the checkpoint, so a resume goes on counting
