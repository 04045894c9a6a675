"""Checkpoint costs for a config: how long a step is blocked by an async save, save and restore
time, size on disk. Prints JSON.

  python benchmarks/checkpoint.py                      # base config, batch 8, float32, CPU
  python benchmarks/checkpoint.py --config tiny
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from train_step import load  # noqa: E402

from mwmae.data.sources import synthetic_source  # noqa: E402
from mwmae.train import checkpoint as ckpt  # noqa: E402
from mwmae.train.engine import Engine  # noqa: E402
from mwmae.train.pretraining import Pretraining  # noqa: E402
from mwmae.workdir import Workdir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    config = load(a.config)
    config.batch_size = a.batch
    config.model.dtype = "float32"
    config.model.scan_unroll = max(config.model.depth, config.model.decoder_depth)
    config.num_train_steps = 1000
    with tempfile.TemporaryDirectory() as tmp:
        t = Engine(Pretraining(config), tmp, devices=jax.devices()[:1])
        state = t.initial_state()
        step = t.compile(state)
        clips = synthetic_source(config.batch_size, config.seed, *config.model.img_size)
        batch = t.global_batch(next(clips))

        def run(state):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            return state, time.perf_counter() - t0

        state, _ = run(state)
        plain = []
        for _ in range(a.steps):
            state, dt = run(state)
            plain.append(dt)
        wd = Workdir(tmp)
        manager = ckpt.make_manager(wd, config)
        t0 = time.perf_counter()
        ckpt.save_checkpoint(wd, manager, 1, state, {"position": 1}, {"step": 1}, force=True)
        blocked = time.perf_counter() - t0     # the loop waits this long (device-to-host copy)
        state, with_save = run(state)          # a step running while the save writes
        manager.wait_until_finished()
        total = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in pathlib.Path(str(wd.checkpoints)).rglob("*")
                   if f.is_file())
        t0 = time.perf_counter()
        restored = ckpt.restore_latest(wd, manager, t.abstract_state())
        jax.block_until_ready(restored[0])
        restore = time.perf_counter() - t0
        step_s = statistics.median(plain)
        print(json.dumps({
            "config": a.config, "batch": a.batch, "device": jax.devices()[0].device_kind,
            "step_s": round(step_s, 3), "save_blocking_s": round(blocked, 3),
            "step_during_save_s": round(with_save, 3),
            "blocked_fraction_of_step": round(blocked / step_s, 3),
            "save_total_s": round(total, 2), "restore_s": round(restore, 2),
            "size_mib": round(size / 2**20, 1),
        }))


if __name__ == "__main__":
    main()
