"""Each of the training loop's hooks on its own, with the parts of a run it touches stood in by
small recording objects (the loop tests run them together on real runs)."""

import dataclasses
import json
import operator
import types

import numpy as np
import pytest
from train_helpers import load_config

from mwmae.data.sources import SyntheticSource
from mwmae.lease import LeaseHeld
from mwmae.train import hooks as hooks_lib
from mwmae.train.config import model_config_from
from mwmae.train.pretraining import Pretraining
from mwmae.workdir import Workdir


class Writer:
    def __init__(self):
        self.scalars, self.images = {}, {}

    def write_scalars(self, step, scalars):
        self.scalars[step] = dict(scalars)

    def write_images(self, step, images):
        self.images[step] = dict(images)


class Manager:
    """Saves on the steps in ``policy``; ``all_steps`` lists what was saved."""

    def __init__(self, policy=()):
        self.policy, self.saved, self.waited = set(policy), [], 0

    def should_save(self, step):
        return step in self.policy

    def all_steps(self):
        return list(self.saved)

    def wait_until_finished(self):
        self.waited += 1


class Watch:
    def __init__(self, at=None, interrupted=False):
        self.at, self.interrupted = at, interrupted

    def reached(self, step, manager):
        return step == self.at


def state(skipped=0, last_skipped=0):
    return types.SimpleNamespace(skipped_steps=np.int32(skipped),
                                 last_skipped_step=np.int32(last_skipped), params={})


def make_run(tmp_path, *, manager=None, watch=None, verified=None, **config_overrides):
    config = load_config("tiny")
    for k, v in config_overrides.items():
        setattr(config, k, v)
    task = Pretraining(config)
    task.reconstructions = lambda params, audio, step: np.full((4, 4, 3), step, np.uint8)
    engine = types.SimpleNamespace(model_config=model_config_from(config), total_steps=10,
                                   config=config, flops_per_example=lambda: 1e6, task=task,
                                   checkpoint_record=lambda step: {"total_steps": 10})
    printed = []
    run = hooks_lib.Run(engine, Workdir(tmp_path), config, Writer(), manager or Manager(),
                        SyntheticSource(8, 0, 200, 80), watch or Watch(), printed.append,
                        start_step=0, verified_step=verified, skipped_steps_at_start=0,
                        started=0.0, previous_seconds=0.0)
    return run, printed


def info(step, st=None, loss=1.0, wait=0.0, done=False):
    metrics = {"loss": np.float32(loss), "learning_rate": np.float32(1e-4),
               "grad_norm": np.float32(0.5), "param_norm": np.float32(3.0),
               "skipped_steps": np.int32(0 if st is None else st.skipped_steps)}
    return hooks_lib.StepInfo(step, st or state(), metrics, np.zeros((8, 200, 80, 1)),
                              np.arange(8), wait, done)


def test_cadence_every_first_last_and_never():
    calls = {k: [] for k in ("every3", "first", "last", "never")}
    hooks = hooks_lib.Hooks(start_step=4)
    hooks.add("every3", lambda i: calls["every3"].append(i.step), 3)
    hooks.add("first", lambda i: calls["first"].append(i.step), 100, first=True)
    hooks.add("last", lambda i: calls["last"].append(i.step), 100, last=True)
    hooks.add("never", lambda i: calls["never"].append(i.step), 0)
    for step in range(5, 11):
        hooks(info(step, done=step == 10))
    assert calls == {"every3": [6, 9], "first": [5], "last": [10], "never": []}


def test_hooks_run_in_the_order_added_and_stop_ends_the_sequence():
    seen = []

    def stop(i):
        raise hooks_lib.Stop("preempted")

    hooks = hooks_lib.Hooks(0)
    hooks.add("a", lambda i: seen.append("a"))
    hooks.add("stop", stop)
    hooks.add("c", lambda i: seen.append("c"))
    with pytest.raises(hooks_lib.Stop) as stopped:
        hooks(info(1))
    assert seen == ["a"] and stopped.value.status == "preempted"


def test_hooks_hand_what_they_return_to_the_later_hooks_of_the_step():
    seen = []
    hooks = hooks_lib.Hooks(0)
    hooks.add("evaluate", lambda i: {"evaluation": {"top1": i.step / 10}}, 2)
    hooks.add("reader", lambda i: seen.append(dict(i.produced)))
    assert hooks(info(1)) == {} and hooks(info(2)) == {"evaluation": {"top1": 0.2}}
    assert seen == [{}, {"evaluation": {"top1": 0.2}}]  # nothing carries over between steps
    hooks.add("writer", lambda i: operator.setitem(i.produced, "x", 1))  # read-only to hooks
    with pytest.raises(TypeError):
        hooks(info(3))
    clash = hooks_lib.Hooks(0)
    clash.add("a", lambda i: {"metrics": 1})
    clash.add("b", lambda i: {"metrics": 2})
    with pytest.raises(ValueError, match="hook 'b' produces 'metrics'"):
        clash(info(1))


def test_batch_trace_writes_loss_bits_and_ids_per_step(tmp_path):
    run, _ = make_run(tmp_path)
    write = hooks_lib.batch_trace(run)
    write(info(1, loss=0.25))
    write(info(2, loss=0.5))
    lines = [json.loads(x) for x in run.workdir.trace_file(0).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert float.fromhex(lines[0]["loss"]) == 0.25 and lines[1]["ids"] == list(range(8))


def test_lease_guard_stops_only_when_the_lease_was_lost(tmp_path):
    run, _ = make_run(tmp_path)
    lease = types.SimpleNamespace(lost=False)
    check = hooks_lib.lease_guard(run, lease)
    check(info(1))
    lease.lost = True
    with pytest.raises(LeaseHeld, match="another trainer took over"):
        check(info(2))


def test_divergence_guard_names_the_newest_good_checkpoint(tmp_path):
    manager = Manager()
    run, _ = make_run(tmp_path, manager=manager, verified=2, nonfinite_policy="stop")
    checkpointer = hooks_lib.Checkpointer(run)
    guard = checkpointer.divergence
    guard(info(3))  # nothing dropped: passes
    checkpointer.saved, manager.saved = [4, 6], [4]  # 6 never committed
    with pytest.raises(FloatingPointError, match=r"step 5 .*checked at step 7.*checkpoints/4"):
        guard(info(7, st=state(skipped=1, last_skipped=5)))
    assert manager.waited == 1
    run.config.nonfinite_policy = "skip"
    guard(info(8, st=state(skipped=1, last_skipped=5)))


def test_metric_logger_averages_the_interval_and_skips_dropped_steps(tmp_path):
    run, printed = make_run(tmp_path)
    logger = hooks_lib.MetricLogger(run, compile_seconds=12.5)
    for step, wait, loss in ((1, 0.010, 1.0), (2, 0.030, 2.0), (3, 0.050, np.nan), (4, 0.0, 4.0)):
        logger.accumulate(info(step, wait=wait, loss=loss))
        if step in (1, 4):
            produced = logger(info(step, loss=loss))
    first, last = run.writer.scalars[1], run.writer.scalars[4]
    assert first["perf/compile_seconds"] == 12.5 and "perf/compile_seconds" not in last
    assert first["data/input_wait_ms_per_step"] == pytest.approx(10.0)
    assert last["data/input_wait_ms_per_step"] == pytest.approx(80 / 3)  # 3 steps
    assert last["train/loss"] == pytest.approx(3.0)  # (2 + 4) / 2: the NaN step is left out
    assert last["train/param_norm"] == pytest.approx(3.0) and last["data/skipped_records"] == 0
    assert 0 < last["data/input_wait_fraction"]
    assert produced["metrics"]["loss"] == last["train/loss"]
    assert printed[-1].startswith("step     4/10  loss 3.0000") and " ETA 0:00:" in printed[-1]


def test_every_metric_has_a_dashboard_group():
    from mwmae.train import metrics

    assert metrics.tagged({"loss": 1.0, "mfu": 0.5}) == {"train/loss": 1.0, "perf/mfu": 0.5}
    with pytest.raises(KeyError, match="without a dashboard group: .'new_thing'."):
        metrics.tagged({"new_thing": 1.0})


def test_hparams_are_the_flattened_config():
    from mwmae.train import metrics

    flat = metrics.hparams(load_config("tiny"))
    assert flat["model.decoder_depth"] == load_config("tiny").model.decoder_depth
    assert flat["model.patch_size"] == "(4, 16)" and flat["mesh.fsdp"] == 1
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())


def test_images_use_the_steps_own_mask_index(tmp_path):
    run, _ = make_run(tmp_path)
    [images] = run.engine.task.hooks(run)
    images.fn(info(5))
    assert int(run.writer.images[5]["train/reconstruction"][0, 0, 0]) == 4


def test_checkpointer_saves_by_policy_at_the_end_and_on_preemption(tmp_path, monkeypatch):
    saves = []
    monkeypatch.setattr(hooks_lib.ckpt, "save_checkpoint",
                        lambda wd, manager, step, st, data, meta, force, metrics: saves.append(
                            (step, data, meta["step"], metrics)) or True)
    run, printed = make_run(tmp_path, manager=Manager(policy={2}), watch=Watch(at=3))
    guard_calls = []
    checkpointer = hooks_lib.Checkpointer(run)
    checkpointer.divergence = guard_calls.append
    save = checkpointer.save
    save(info(1))
    save(info(2))
    with pytest.raises(hooks_lib.Stop) as stop:
        save(info(3))
    assert stop.value.status == "preempted" and printed[-1].startswith("preempted: saving step 3")
    assert [s[0] for s in saves] == [2, 3] and checkpointer.saved == [2, 3]
    assert saves[0][1] == {"position": 0} and len(guard_calls) == 2
    assert saves[0][3] is None
    checkpointer.run = dataclasses.replace(run, watch=Watch())
    # An evaluated step is saved with its metrics (the best-checkpoint policy ranks by them).
    save(dataclasses.replace(info(4), produced={"evaluation": {"mAP": 0.5}}))
    assert saves[-1][0] == 4 and saves[-1][3] == {"mAP": 0.5}
    save(info(5))  # the evaluation was that step's alone
    assert saves[-1][0] == 4
    save(info(10, done=True))
    assert checkpointer.saved[-1] == 10


def test_a_diverged_state_is_never_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(hooks_lib.ckpt, "save_checkpoint", lambda *a, **k: pytest.fail("saved"))
    run, _ = make_run(tmp_path, manager=Manager(policy={2}), nonfinite_policy="stop")
    save = hooks_lib.Checkpointer(run).save
    with pytest.raises(FloatingPointError):
        save(info(2, st=state(skipped=1, last_skipped=2)))


def test_standard_hooks_follow_the_config(tmp_path):
    run, _ = make_run(tmp_path, trace_batches=True, image_every_steps=0, log_every_steps=2)
    hooks = hooks_lib.standard_hooks(run, lease=None, compile_seconds=0.0)
    assert hooks.schedule() == [
        ("trace", 1, False, False), ("progress", 1, False, False),
        ("interval", 1, False, False), ("divergence", 2, True, True),
        ("metrics", 2, True, True), ("images", 0, False, False),
        ("checkpoint", 1, False, False)]
    run.config.image_every_steps, run.config.trace_batches = 5, False
    lease = types.SimpleNamespace(lost=False)
    names = [s[0] for s in hooks_lib.standard_hooks(run, lease=lease,
                                                    compile_seconds=0.0).schedule()]
    assert names[0] == "lease" and "trace" not in names
    assert ("images", 5, False, True) in hooks_lib.standard_hooks(
        run, lease=None, compile_seconds=0.0).schedule()


def test_the_loop_fits_on_one_screen():
    import inspect

    from mwmae.train.loop import train

    lines = inspect.getsource(train).splitlines()
    assert len(lines) <= 50, f"train() has grown to {len(lines)} lines: move work into a hook"
