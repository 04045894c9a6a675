"""Launch a training run as several local processes (hosts) that form one JAX cluster."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import portpicker

from mwmae.data import records
from mwmae.data.synthetic import synthetic_logmel

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_id_shards(folder: pathlib.Path, clips: int, per_shard: int) -> str:
    """Shards whose clip k has label [k], so a trace of labels is a trace of clips seen."""
    folder.mkdir(parents=True)
    rows = ["shard,num_records"]
    for s in range(clips // per_shard):
        name = f"train-{s:05d}.tfrecord"
        with open(folder / name, "wb") as f:
            w = records.TFRecordWriter(f)
            for k in range(s * per_shard, (s + 1) * per_shard):
                clip = np.concatenate([synthetic_logmel(k)[:, :, 0]] * 2)[:260]
                w.write(records.encode_example(clip, [k]))
            w.close()
        rows.append(f"{name},{per_shard}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "manifest.csv")


def launch(workdir: pathlib.Path, overrides: list[str], num_processes: int = 2,
           devices_per_process: int = 4, log_dir: pathlib.Path | None = None,
           module: str = "mwmae.train", config: str = "configs/tiny.py"
           ) -> list[subprocess.Popen]:
    port = portpicker.pick_unused_port()
    env = {**os.environ,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "PYTHONPATH": str(REPO)}
    procs = []
    log_dir = log_dir or workdir.parent
    for i in range(num_processes):
        cmd = [sys.executable, "-m", module, "--config", f"{REPO}/{config}",
               "--workdir", str(workdir), f"--coordinator_address=127.0.0.1:{port}",
               f"--num_processes={num_processes}", f"--process_id={i}", *overrides]
        log = open(log_dir / f"{workdir.name}-host{i}.log", "ab")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=REPO))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def read_trace(workdir: pathlib.Path, host: int) -> dict[int, dict]:
    """{step: record}; a step logged twice (before a crash and after the resume) keeps the
    last record."""
    import json

    path = workdir / "trace" / f"host{host}.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out
