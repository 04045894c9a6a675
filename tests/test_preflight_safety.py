"""The preflight never harms the workdir it checks: one preflight (or trainer) at a time, its
scratch its own, refusals before the first write, Ctrl-C said in one line; and the trainer's and
the preflight's command lines refuse what they cannot run before writing anything."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import pytest
from train_helpers import load_config, set_key

from mwmae.lease import Lease, LeaseHeld
from mwmae.preflight import hardware, run, storage
from mwmae.train import config as train_config
from mwmae.train.config import ConfigError
from mwmae.train.engine import Engine
from mwmae.train.pretraining import Pretraining
from mwmae.workdir import ConfigMismatch, Workdir, WorkdirError

REPO = pathlib.Path(__file__).resolve().parents[1]


class RanPastTheRefusal(Exception):
    """Raised by the first check: the preflight got past where it should have refused."""


@pytest.fixture
def first_check_raises(monkeypatch):
    """Refusals are tested without the minute a whole preflight takes: the first check raises,
    so a preflight that does not refuse fails the test at once."""
    def devices(config):
        raise RanPastTheRefusal
    monkeypatch.setattr(hardware, "check_devices", devices)


def tiny():
    return load_config("tiny")


def test_a_workdir_held_by_a_live_writer_is_refused_before_writing(tmp_path,
                                                                   first_check_raises):
    wd = Workdir(tmp_path / "wd")
    with Lease(wd.lease_path, who="trainer pid 4242 on node-a"):
        with pytest.raises(LeaseHeld, match="trainer pid 4242 on node-a"):
            run.run(tiny(), str(wd), print_fn=lambda _: None, remember=False)
        assert not wd.preflight_path.exists()
        assert not wd.preflight_scratch.exists()
    assert not pathlib.Path(wd.lease_path).exists()


def test_the_preflight_holds_the_lease_while_it_runs_and_lets_it_go(tmp_path, monkeypatch):
    wd = Workdir(tmp_path / "wd")
    seen = []

    def devices(config):
        # A trainer starting now is refused, and told it is a preflight that holds the workdir.
        with pytest.raises(LeaseHeld, match="another preflight is writing this workdir"):
            Lease(wd.lease_path).acquire()
        seen.append(True)
        raise RanPastTheRefusal
    monkeypatch.setattr(hardware, "check_devices", devices)
    with pytest.raises(RanPastTheRefusal):
        run.run(tiny(), str(wd), print_fn=lambda _: None, remember=False)
    assert seen
    with Lease(wd.lease_path):  # released on the way out, even by an error
        pass


def test_storage_removes_only_its_own_scratch(tmp_path):
    """A preflight's storage check on a workdir where another one's scratch is being written
    leaves that scratch alone (it used to remove the whole preflight-scratch folder, failing
    the other with 'a checkpoint cannot be saved there' on a healthy disk)."""
    wd = Workdir(tmp_path / "wd")
    other = wd.preflight_scratch / "other-host-1234-0badcafe"
    other.mkdir(parents=True)
    (other / "probe.bin").write_bytes(b"busy")
    t = Engine(Pretraining(tiny()), str(wd), devices=jax.devices()[:1])
    section = storage.check_storage(t, wd.preflight_scratch, t.initial_state(), 0.1)
    assert section.verdict in ("ok", "warn"), section.lines
    assert (other / "probe.bin").read_bytes() == b"busy"
    assert [p.name for p in wd.preflight_scratch.iterdir()] == [other.name]


def test_an_interrupted_storage_check_removes_its_scratch(tmp_path, monkeypatch):
    wd = Workdir(tmp_path / "wd")
    t = Engine(Pretraining(tiny()), str(wd), devices=jax.devices()[:1])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(storage, "_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.check_storage(t, wd.preflight_scratch, t.initial_state(), 0.1)
    assert not wd.preflight_scratch.exists()


@pytest.mark.parametrize("inside", ["checkpoints/30/P.json", "checkpoints/P.json",
                                    "tensorboard/P.json", "config.json"])
def test_out_inside_another_workdirs_layout_is_refused(tmp_path, first_check_raises, inside):
    other = Workdir(tmp_path / "other")
    (other.checkpoints / "30").mkdir(parents=True)
    other.tensorboard.mkdir()
    other.config_path.write_text(tiny().to_json_best_effort())
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = other.path / inside
    with pytest.raises(WorkdirError, match=f"--out {re.escape(str(out))}: .*"
                       f"{re.escape(str(other.path))}"):
        run.run(tiny(), str(tmp_path / "wd"), str(out), print_fn=lambda _: None,
                remember=False)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_out_in_the_checkpoints_of_a_workdir_without_its_config_is_refused(
        tmp_path, first_check_raises):
    other = Workdir(tmp_path / "other")
    (other.checkpoints / "30").mkdir(parents=True)
    with pytest.raises(WorkdirError, match="inside the training workdir"):
        run.run(tiny(), None, str(other.checkpoints / "31" / "P.json"),
                print_fn=lambda _: None, remember=False)
    assert [p.name for p in other.checkpoints.iterdir()] == ["30"]


@pytest.mark.parametrize("where", ["workdir", "project"])
def test_out_beside_a_workdir_or_in_a_project_folder_is_not_refused(
        tmp_path, first_check_raises, where):
    """Only a workdir's own names are refused: a report next to its config is fine, and so is
    one in the logs of a folder that merely has a checkpoints/ folder (not a workdir)."""
    folder = Workdir(tmp_path / "folder")
    folder.checkpoints.mkdir(parents=True)
    if where == "workdir":
        folder.config_path.write_text(tiny().to_json_best_effort())
        out = folder.path / "notes" / "P.json"
    else:
        out = folder.tensorboard / "P.json"
    with pytest.raises(RanPastTheRefusal):
        run.run(tiny(), None, str(out), print_fn=lambda _: None, remember=False)


def test_a_workdir_of_another_config_is_refused_before_writing(tmp_path, first_check_raises):
    wd = Workdir(tmp_path / "wd")
    theirs = tiny()
    theirs.seed = 7
    wd.write_config(theirs.to_json_best_effort())
    with pytest.raises(ConfigMismatch, match="seed"):
        run.run(tiny(), str(wd), print_fn=lambda _: None, remember=False)
    assert sorted(p.name for p in wd.path.iterdir()) == ["config.json"]


def test_a_workdir_of_the_same_config_is_checked(tmp_path, first_check_raises):
    wd = Workdir(tmp_path / "wd")
    wd.write_config(tiny().to_json_best_effort())
    with pytest.raises(RanPastTheRefusal):
        run.run(tiny(), str(wd), print_fn=lambda _: None, remember=False)


@pytest.mark.parametrize("key, value", [
    ("num_train_steps", 10**20), ("num_train_steps", 2**31), ("checkpoint.every_steps", 2**40),
    ("seed", 2**70), ("data.shuffle_buffer", -2**64)])
def test_integers_out_of_range_are_refused_naming_the_key(key, value):
    config = tiny()
    set_key(config, key, value)
    with pytest.raises(ConfigError, match=f"{key}={value}"):
        train_config.check_int_range(config)


def test_integers_in_range_pass():
    config = tiny()
    config.num_train_steps = 2**31 - 1
    config.seed = 2**63 - 1
    train_config.check_int_range(config)


def test_epochs_times_steps_per_epoch_must_fit_the_step_counter():
    config = tiny()
    config.num_train_steps, config.num_epochs, config.steps_per_epoch = -1, 2**16, 2**16
    with pytest.raises(ConfigError, match="num_epochs"):
        train_config.check_int_range(config)


def test_the_preflight_refuses_an_integer_out_of_range(tmp_path, first_check_raises):
    config = tiny()
    config.num_train_steps = 10**20
    with pytest.raises(ConfigError, match="num_train_steps"):
        run.run(config, str(tmp_path / "wd"), print_fn=lambda _: None, remember=False)
    assert not (tmp_path / "wd").exists()


def _env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "PYTHONUNBUFFERED": "1"}


def test_the_trainer_refuses_a_step_count_past_its_counter_before_writing(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mwmae.train", "--config", "configs/tiny.py",
         "--config.data.num_workers=0", "--workdir", str(tmp_path / "wd"),
         "--config.num_train_steps=100000000000000000000"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=_env())
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "num_train_steps=100000000000000000000" in last
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "wd").exists()


def _wait_for(path: pathlib.Path, proc: subprocess.Popen, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None and not path.exists():
        time.sleep(0.2)


@pytest.mark.slow
def test_two_preflights_on_one_workdir_and_ctrl_c(tmp_path):
    """The second preflight on a workdir is refused in one line naming the first, and writes
    nothing; Ctrl-C stops the first with 'interrupted', exit 130, its scratch and lease gone."""
    wd = Workdir(tmp_path / "wd")
    argv = [sys.executable, "-m", "mwmae.preflight", "--config", "configs/tiny.py",
            "--config.data.num_workers=0", "--workdir", str(wd)]
    env = {**_env(), "MWMAE_CACHE_DIR": str(tmp_path / "cache")}
    first = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(pathlib.Path(wd.lease_path), first, 120)
        assert first.poll() is None, first.communicate()
        second = subprocess.run([*argv, "--out", str(tmp_path / "second.json")], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and f"pid {first.pid}" in last, last
        assert "Traceback" not in second.stderr
        assert not (tmp_path / "second.json").exists()
        assert first.poll() is None  # the first goes on untouched
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted", stderr[-3000:]
    assert "Traceback" not in stderr
    assert not wd.preflight_scratch.exists()
    assert not wd.preflight_path.exists()
    assert not pathlib.Path(wd.lease_path).exists()



def test_a_first_ctrl_c_waits_for_a_safe_point_and_a_second_stops_at_once():
    """A KeyboardInterrupt raised inside a garbage-collection callback is dropped by Python (the
    preflight then ran on and wrote its report): the first Ctrl-C is only noted, and the next
    safe point raises it; a second one raises at once."""
    import os

    from mwmae.preflight import run as preflight_run

    before = signal.getsignal(signal.SIGINT)
    with preflight_run._ctrl_c_at_safe_points():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # let the handler run: nothing is raised here
            pass
        with pytest.raises(KeyboardInterrupt):
            preflight_run._stop_if_asked()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
    assert signal.getsignal(signal.SIGINT) is before
    preflight_run._stop_if_asked()  # outside, nothing is pending
