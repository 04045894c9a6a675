"""One and two hosts x four devices, input worker processes on: kill -9 and SIGTERM in the
middle of a run, then resume."""

import random
import signal
import time

import pytest
from multihost_helpers import launch, read_trace, wait_all, write_id_shards

# Each test runs two to four multi-process trainings (~3 min apiece on 2 cores): CI runs them
# with the slow group.
pytestmark = pytest.mark.slow

STEPS = 12
COMMON = [f"--config.num_train_steps={STEPS}", "--config.checkpoint.every_steps=4",
          "--config.trace_batches=True", "--config.image_every_steps=0",
          "--config.log_every_steps=1", "--config.data.source=shards",
          "--config.data.shuffle_buffer=16", "--config.data.cycle_length=2",
          "--config.data.num_workers=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 64 clips = 8 steps of 8: steps 1-8 are one epoch, 9-12 start the next.
    return write_id_shards(tmp_path_factory.mktemp("shards") / "s", clips=64, per_shard=16)


def _run_uninterrupted(workdir, shards, hosts):
    assert wait_all(launch(workdir, COMMON + [f"--config.data.train_shards={shards}"],
                           num_processes=hosts)) == [0] * hosts
    traces = [read_trace(workdir, h) for h in range(hosts)]
    assert all(sorted(t) == list(range(1, STEPS + 1)) for t in traces)
    return traces


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards):
    return _run_uninterrupted(tmp_path_factory.mktemp("a") / "run", shards, 2)


def _wait_for(predicate, procs, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a host exited early: {[p.poll() for p in procs]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def _kill_9_and_resume(workdir, shards, reference, hosts):
    # The default lease (120 s): the restart on this same host must not wait for it to go
    # stale, since the killed holder's pid is gone.
    args = COMMON + [f"--config.data.train_shards={shards}"]
    kill_at = random.Random().randint(5, 10)
    procs = launch(workdir, args, num_processes=hosts)
    _wait_for(lambda: (workdir / "checkpoints" / "4" / "commit_success.txt").exists()
              and len(read_trace(workdir, 0)) >= kill_at, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    wait_all(procs)
    assert max(read_trace(workdir, 0)) < STEPS, "the run finished before it was killed"

    assert wait_all(launch(workdir, args, num_processes=hosts)) == [0] * hosts
    log = (workdir.parent / f"{workdir.name}-host0.log").read_text()
    assert "that process is gone (killed or crashed) on this host" in log
    for host in range(hosts):
        resumed = read_trace(workdir, host)
        assert sorted(resumed) == list(range(1, STEPS + 1))
        for step in range(1, STEPS + 1):
            # float32 losses compared as exact hex; clip ids identical
            assert resumed[step] == reference[host][step], (host, step, kill_at)
    # one epoch (steps 1-8) covers each of the 64 clips exactly once across the hosts
    seen = [i for h in range(hosts) for s in range(1, 9) for i in
            (row[0] for row in read_trace(workdir, h)[s]["ids"])]
    assert sorted(seen) == list(range(64))


def test_kill_9_then_resume_is_bitwise_identical(tmp_path, shards, uninterrupted):
    _kill_9_and_resume(tmp_path / "run", shards, uninterrupted, hosts=2)


def test_kill_9_then_resume_single_host_with_workers(tmp_path, shards):
    reference = _run_uninterrupted(tmp_path / "reference", shards, 1)
    _kill_9_and_resume(tmp_path / "run", shards, reference, hosts=1)


def test_sigterm_saves_the_current_step_on_both_hosts_and_exits_0(tmp_path, shards,
                                                                   uninterrupted):
    workdir = tmp_path / "run"
    args = COMMON + [f"--config.data.train_shards={shards}", "--config.checkpoint.every_steps=0"]
    procs = launch(workdir, args)
    _wait_for(lambda: len(read_trace(workdir, 0)) >= 3, procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert wait_all(procs) == [0, 0]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and 3 <= steps[0] < STEPS, steps
    saved = steps[0]
    assert max(read_trace(workdir, 0)) == max(read_trace(workdir, 1)) == saved

    assert wait_all(launch(workdir, args)) == [0, 0]
    for host in (0, 1):
        trace = read_trace(workdir, host)
        assert sorted(trace) == list(range(1, STEPS + 1))
        assert all(trace[s] == uninterrupted[host][s] for s in range(1, STEPS + 1))
