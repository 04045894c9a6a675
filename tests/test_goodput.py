"""Goodput: the ledger's arithmetic on written-out lines, the recorder on its own, and real runs
stopped without their last line (in-process, and by SIGKILL) then resumed."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util
from test_hooks import info, make_run
from train_helpers import REPO, load_config

from mwmae import checkpoint as inspect_cli
from mwmae import goodput
from mwmae.data.sources import SyntheticSource
from mwmae.train import goodput as recorder_lib
from mwmae.train import hooks as hooks_lib
from mwmae.workdir import Workdir


def line(segment, start_step, step, productive, *, started=0.0, startup=1.0, compile_=2.0,
         wait=0.5, ckpt=0.25, evaluation=0.0, final=False):
    measured = {"startup": startup, "compile": compile_, "input_wait": wait,
                "checkpoint": ckpt, "evaluation": evaluation}
    wall = sum(measured.values()) + productive
    return goodput.segment_line(segment, started, start_step, step, wall, measured, final)


def test_steps_redone_after_a_restore_below_the_last_step_are_recomputed():
    # A: 0 -> 30, flushed at 10, 20, 30, then killed; its newest checkpoint was step 15.
    a = [line("a", 0, 10, 10.0), line("a", 0, 20, 20.0), line("a", 0, 30, 30.0)]
    # B resumes at 15 and finishes at 40.
    b = [line("b", 15, 20, 5.0, started=100.0), line("b", 15, 40, 25.0, started=100.0,
                                                       final=True)]
    s = goodput.summarise(a + b)
    # A's productive time through step 15 is halfway between its lines at 10 and 20.
    assert s.seconds["recomputed"] == pytest.approx(30.0 - 15.0)
    assert s.seconds["productive"] == pytest.approx(15.0 + 25.0)
    assert s.total == pytest.approx(a[-1].wall + b[-1].wall)
    assert s.seconds["compile"] == pytest.approx(4.0) and s.segments == 2
    assert s.unfinished == 1 and s.last_step == 40
    assert s.between == pytest.approx(100.0 - a[-1].wall)
    shares = s.fractions()
    assert tuple(shares) == goodput.FRACTIONS
    assert shares["goodput"] == pytest.approx(40.0 / s.total)
    assert shares["goodput"] + sum(v for k, v in shares.items() if k != "goodput") == (
        pytest.approx(1.0))


def test_a_restore_below_a_segments_start_redoes_all_of_it_and_nothing_after_its_end():
    a = [line("a", 0, 10, 10.0), line("a", 0, 20, 20.0)]
    b = [line("b", 20, 30, 10.0)]          # resumed from A's last step: nothing redone
    c = [line("c", 10, 12, 2.0)]           # checkpoints 20 and 30 lost: back to 10
    s = goodput.summarise(a + b + c)
    assert s.seconds["recomputed"] == pytest.approx(10.0 + 10.0)
    assert s.seconds["productive"] == pytest.approx(10.0 + 2.0)
    # A resume above the last flushed step (the kill came after a save, before the next
    # flush) redoes nothing that was counted.
    assert goodput.summarise([line("a", 0, 10, 10.0), line("b", 15, 16, 1.0)]).seconds[
        "recomputed"] == 0.0


def test_a_torn_last_line_is_skipped_and_the_next_line_starts_on_its_own(tmp_path):
    wd = Workdir(tmp_path)
    assert wd.read_goodput() == ([], 0)
    first, second = line("a", 0, 1, 1.0), line("a", 0, 2, 2.0)
    wd.append_goodput(first.to_json())
    wd.append_goodput(second.to_json())
    with open(wd.goodput_path, "a") as f:      # a kill in the middle of a write
        f.write(json.dumps(line("a", 0, 3, 3.0).to_json())[:25])
    rows, unreadable = wd.read_goodput()
    assert [r["step"] for r in rows] == [1, 2] and unreadable == 1
    wd.append_goodput(line("b", 2, 4, 1.0, final=True).to_json())
    rows, unreadable = wd.read_goodput()
    assert [r["step"] for r in rows] == [1, 2, 4] and unreadable == 1
    s = goodput.summarise_rows(rows, unreadable)
    assert s.segments == 2 and s.skipped_lines == 1
    assert "1 unreadable line(s) skipped" in goodput.describe(s)
    assert goodput.Line.from_json(rows[0]) == first


def test_the_recorder_times_hooks_even_when_they_stop_the_run(tmp_path):
    run, _ = make_run(tmp_path)
    began = time.perf_counter() - 3.0
    rec = recorder_lib.Recorder(run.workdir, run.writer, 0, began, compile_seconds=1.0)
    rec.loop_begins()
    assert rec.measured["startup"] == pytest.approx(2.0, abs=0.5)

    def stop(info):
        time.sleep(0.05)
        raise hooks_lib.Stop("preempted")

    with pytest.raises(hooks_lib.Stop):
        rec.timed("checkpoint", stop)(None)
    assert rec.measured["checkpoint"] >= 0.05
    with pytest.raises(KeyError, match="not a measured part"):
        rec.timed("lunch", stop)
    time.sleep(0.25)  # the input wait the step reports: a line's parts must fit in its wall
    rec.count(info(1, wait=0.25))
    rec.at_log_point(info(1))
    rec.at_log_point(info(2, done=True))   # the last line is close()'s
    rows, _ = run.workdir.read_goodput()
    assert [r["step"] for r in rows] == [1] and rows[0]["input_wait"] == 0.25
    assert set(run.writer.scalars[1]) == {f"perf/{k}" for k in goodput.FRACTIONS}
    rec.lease = types.SimpleNamespace(lost=True)
    rec.close()                                   # another trainer holds the workdir now
    assert len(run.workdir.read_goodput()[0]) == 1


def test_standard_hooks_time_the_checkpoint_and_task_hooks(tmp_path):
    run, _ = make_run(tmp_path, image_every_steps=3, log_every_steps=2)
    rec = recorder_lib.Recorder(run.workdir, run.writer, 0, time.perf_counter(), 0.0)
    hooks = hooks_lib.standard_hooks(run, lease=None, compile_seconds=0.0, goodput=rec)
    names = [name for name, *_ in hooks.schedule()]
    assert names[0] == "goodput" and ("goodput_log", 2, True, False) in hooks.schedule()
    assert names.index("goodput_log") > names.index("metrics")
    run.engine.task.reconstructions = lambda params, audio, step: time.sleep(0.05) or [[0]]
    hooks(info(3, wait=0.125))   # a step with images, no log point
    assert rec.measured["evaluation"] >= 0.05   # the task's hook, timed
    assert rec.step == 3 and rec.measured["input_wait"] == 0.125


def _summary(wd):
    return goodput.summarise_rows(*Workdir(wd).read_goodput())


def _fast_config(steps):
    c = load_config("tiny")
    c.num_train_steps = steps
    c.log_every_steps = 1
    c.checkpoint.every_steps = 3
    c.image_every_steps = 0
    return c


def test_figures_survive_a_run_that_died_without_its_last_line(tmp_path, monkeypatch, capsys):
    """In-process stand-in for a kill: the recorder's last line is never written and the run
    dies drawing step 5's batch, two steps after its checkpoint at 3."""
    from mwmae.train.loop import train
    from mwmae.train.pretraining import Pretraining

    wd = tmp_path / "wd"
    original = SyntheticSource.next_local

    def dies_at_5(self):
        if self.position == 4:
            raise RuntimeError("the host went away")
        return original(self)

    with monkeypatch.context() as m:
        m.setattr(SyntheticSource, "next_local", dies_at_5)
        m.setattr(recorder_lib.Recorder, "close", lambda self: None)
        with pytest.raises(RuntimeError, match="went away"):
            train(Pretraining, _fast_config(100), wd, print_fn=lambda _: None)
    before = _summary(wd)
    assert before.segments == 1 and before.unfinished == 1 and before.last_step == 4
    assert before.seconds["recomputed"] == 0
    assert Workdir(wd).steps() == [3]

    lines = []
    train(Pretraining, _fast_config(6), wd, print_fn=lines.append)
    assert lines[0].startswith("resumed from step 3")
    after = _summary(wd)
    assert after.segments == 2 and after.unfinished == 1 and after.last_step == 6
    assert after.seconds["recomputed"] > 0          # step 4, done twice
    assert after.total >= before.total and 0 < after.goodput < 1
    for part in ("startup", "compile", "input_wait", "checkpoint", "evaluation"):
        assert after.seconds[part] >= before.seconds[part], part
    assert (after.seconds["productive"] + after.seconds["recomputed"]
            >= before.seconds["productive"])

    assert inspect_cli.main(["inspect", str(wd)]) == 0
    out = capsys.readouterr().out
    assert f"goodput: {100 * after.goodput:.1f}% of" in out and "over 2 segments" in out
    assert "recomputed" in out and "1 without a final line" in out

    acc = event_accumulator.EventAccumulator(str(wd / "tensorboard"),
                                             size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    events = acc.Tensors("perf/goodput")
    # Both segments wrote it; the second's last value is the whole run's.
    assert [e.step for e in events][-3:] == [4, 5, 6]
    last = float(tensor_util.make_ndarray(events[-1].tensor_proto))
    assert last == pytest.approx(after.goodput, abs=1e-3)


@pytest.mark.slow  # two trainer processes, ~1-2 min on 2 cores
def test_figures_survive_kill_9_and_resume(tmp_path):
    wd = tmp_path / "wd"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

    def cmd(*overrides):
        return [sys.executable, "-m", "mwmae.train", "--config", str(REPO / "configs/tiny.py"),
                "--workdir", str(wd), "--config.image_every_steps=0",
                "--config.log_every_steps=1", "--config.checkpoint.every_steps=5",
                "--config.lease_seconds=2", *overrides]

    proc = subprocess.Popen(cmd("--config.num_train_steps=100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        for out in proc.stdout:
            if out.startswith("step     8/"):
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = _summary(wd)
    assert before.segments == 1 and before.unfinished == 1 and before.last_step >= 7
    time.sleep(2.5)  # the killed run's lease goes stale

    r = subprocess.run(cmd("--config.num_train_steps=12"), capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = int(r.stdout.split("resumed from step ")[1].split()[0])
    assert resumed <= 5 < before.last_step
    after = _summary(wd)
    assert after.segments == 2 and after.last_step == 12 and after.unfinished == 1
    assert after.seconds["recomputed"] > 0 and after.total >= before.total
    assert 0 < after.goodput < 1
    out = subprocess.run([sys.executable, "-m", "mwmae.checkpoint", "inspect", str(wd)],
                         capture_output=True, text=True, timeout=120, env=env).stdout
    assert "goodput: " in out and "over 2 segments" in out, out
    acc = event_accumulator.EventAccumulator(str(wd / "tensorboard"),
                                             size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    assert acc.Tensors("perf/goodput")[-1].step == 12
