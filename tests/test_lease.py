"""The workdir's writer lease, locally and on gs:// (emulator), and two trainers on one workdir."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import REPO

from mwmae.lease import Lease, LeaseHeld, LeaseLost


@pytest.fixture(params=["local", "gs"])
def lease_path(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "wd" / "writer.lease")
        return
    import gcs_emulator

    with gcs_emulator.emulated_gcs(("lease-bucket",)):
        yield "gs://lease-bucket/run/writer.lease"


def test_second_holder_is_refused_naming_the_first(lease_path):
    first = Lease(lease_path, stale_after_s=60, who="trainer A")
    first.acquire()
    with pytest.raises(LeaseHeld, match=r"trainer A \(refreshed \d+ s ago; stale after 60 s"):
        Lease(lease_path, stale_after_s=60, who="trainer B").acquire()
    first.release()
    second = Lease(lease_path, stale_after_s=60, who="trainer B")
    second.acquire()   # released leases are free at once
    assert Lease(lease_path).holder().who == "trainer B"
    second.release()
    assert Lease(lease_path).holder() is None


def test_a_stale_lease_is_taken_over_and_the_old_holder_learns_it(lease_path):
    dead = Lease(lease_path, stale_after_s=1.0, who="killed trainer")
    dead.acquire()
    with pytest.raises(LeaseHeld):
        Lease(lease_path, stale_after_s=1.0).acquire()
    time.sleep(1.3)   # never refreshed: as if killed -9
    successor = Lease(lease_path, stale_after_s=1.0, who="successor")
    successor.acquire()
    assert Lease(lease_path).holder().who == "successor"
    with pytest.raises(LeaseLost, match="taken over by successor"):
        dead.refresh()
    successor.release()


def test_refreshing_keeps_a_live_lease_fresh(lease_path):
    holder = Lease(lease_path, stale_after_s=1.0, who="live")
    holder.acquire()
    holder.start_refreshing()
    try:
        time.sleep(1.6)
        with pytest.raises(LeaseHeld, match="live"):
            Lease(lease_path, stale_after_s=1.0).acquire()
        assert not holder.lost
    finally:
        holder.release()


# ---- a holder that died on this host ------------------------------------------------------------

def _acquire_and_die(path: str) -> int:
    """A process that takes the lease and exits without releasing it (as kill -9 would);
    its pid."""
    code = ("import os, sys; from mwmae.lease import Lease; "
            "Lease(sys.argv[1], stale_after_s=600, who='crashed trainer').acquire(); "
            "print(os.getpid()); os._exit(0)")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       timeout=60, check=True)
    return int(r.stdout.strip())


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    path = str(tmp_path / "wd" / "writer.lease")
    pid = _acquire_and_die(path)
    assert Lease(path).holder().pid == pid and not Lease(path).holder().is_stale()
    successor = Lease(path, stale_after_s=600, who="rerun")
    with caplog.at_level("WARNING"):
        successor.acquire()   # not 600 s later
    assert "crashed trainer: that process is gone (killed or crashed) on this host" in \
        caplog.text
    successor.release()


@pytest.mark.parametrize("field,value", [("host", "another-host"), ("boot", "another-boot"),
                                         ("pid", 0)])
def test_a_dead_pid_elsewhere_or_unknown_waits_for_staleness(tmp_path, field, value):
    """A pid means nothing on another machine or after a reboot: such a holder is judged by
    its refresh time alone."""
    path = str(tmp_path / "wd" / "writer.lease")
    _acquire_and_die(path)
    lease = json.loads(pathlib.Path(path).read_text())
    lease[field] = value
    pathlib.Path(path).write_text(json.dumps(lease))
    with pytest.raises(LeaseHeld, match="crashed trainer"):
        Lease(path, stale_after_s=600).acquire()


def test_a_live_holder_on_this_host_is_refused(tmp_path):
    path = str(tmp_path / "wd" / "writer.lease")
    holder = Lease(path, stale_after_s=600, who="running trainer")
    holder.acquire()
    try:
        with pytest.raises(LeaseHeld, match="running trainer"):
            Lease(path, stale_after_s=600).acquire()
    finally:
        holder.release()


# ---- two trainers, end to end ----------------------------------------------------------------

def _trainer(workdir, *overrides, env=None):
    cmd = [sys.executable, "-m", "mwmae.train", "--config", str(REPO / "configs/tiny.py"),
           "--workdir", str(workdir), "--config.image_every_steps=0",
           "--config.log_every_steps=1", *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_second_trainer_refused_while_the_first_runs_accepted_after_kill_9(tmp_path):
    wd = tmp_path / "wd"
    lease_file = wd / "writer.lease"
    first = _trainer(wd, "--config.num_train_steps=100000", "--config.lease_seconds=3")
    try:
        _wait_for(lambda: (wd / "checkpoints").exists() or first.poll() is not None, 120,
                  "the first trainer to start")
        assert first.poll() is None, first.communicate()
        holder = json.loads(lease_file.read_text())["who"]
        t0 = time.monotonic()
        second = subprocess.run(_trainer_cmd(wd, "--config.num_train_steps=4"),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert "another trainer is writing this workdir" in last and holder in last, last
        assert time.monotonic() - t0 < 60
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # The killed run's pid is gone on this host: the next run takes its lease over at once,
    # without waiting for it to go stale.
    third = subprocess.run(_trainer_cmd(wd, "--config.num_train_steps=2",
                                        "--config.checkpoint.every_steps=1",
                                        "--config.lease_seconds=120"),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "that process is gone (killed or crashed) on this host" in third.stderr
    assert not lease_file.exists()   # released on a clean exit


def _trainer_cmd(workdir, *overrides):
    return [sys.executable, "-m", "mwmae.train", "--config", str(REPO / "configs/tiny.py"),
            "--workdir", str(workdir), "--config.image_every_steps=0", *overrides]
