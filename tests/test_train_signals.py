"""The trainer as a process: Ctrl-C saves and exits 130; a failed run ends with its real error."""

import os
import signal
import subprocess
import sys
import time

import pytest
from multihost_helpers import write_id_shards
from train_helpers import REPO

from mwmae.workdir import Workdir


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "mwmae.train", "--config", str(REPO / "configs/tiny.py"),
            "--workdir", str(workdir), "--config.image_every_steps=0",
            "--config.log_every_steps=1", *overrides]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_exits_130(tmp_path):
    wd = tmp_path / "wd"
    proc = subprocess.Popen(_cmd(wd, "--config.num_train_steps=100000",
                                 "--config.checkpoint.every_steps=0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    lines = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step     3/"):
                proc.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, lines
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines += out.splitlines()
    assert proc.returncode == 130, err[-3000:]
    interrupted = [ln for ln in lines if ln.startswith("interrupted: saving step")]
    assert interrupted, lines
    step = int(interrupted[0].split()[3])
    assert step >= 3 and Workdir(wd).steps() == [step]   # no periodic saves: only Ctrl-C's
    ledger = Workdir(wd).read_goodput()[0]    # the stop wrote the goodput ledger's last line
    assert ledger[-1]["final"] and ledger[-1]["step"] == step
    assert "Ctrl-C again to stop at once" in err


@pytest.mark.slow
def test_the_last_line_of_a_failed_run_is_its_error(tmp_path):
    """A damaged shard read mid-run with async saves in flight every step: nothing from the
    checkpointer or reader threads comes after the error."""
    manifest = write_id_shards(tmp_path / "shards", clips=64, per_shard=16)
    bad = sorted((tmp_path / "shards").glob("*.tfrecord"))[2]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    r = subprocess.run(_cmd(tmp_path / "wd", "--config.num_train_steps=40",
                            "--config.checkpoint.every_steps=1", "--config.data.source=shards",
                            f"--config.data.train_shards={manifest}",
                            "--config.data.shuffle_buffer=1", "--config.data.cycle_length=1"),
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: RecordError: ") and bad.name in last, r.stderr[-3000:]
    assert "corrupt" in last
