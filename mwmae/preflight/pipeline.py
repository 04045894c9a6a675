"""The ``input`` check: the config's input pipeline on this host (its shards, its workers) in
clips/s, against what the step consumes per host."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from mwmae.preflight.report import FAIL, OK, WARN, Section

# Below this ratio of supply to demand the run waits for its input.
HEADROOM = 1.2


def check_input(trainer: Any, step_seconds: float | None, *, batches: int = 20,
                budget_s: float = 20.0) -> Section:
    s = Section("input")
    c = trainer.config
    local_batch = c.batch_size // jax.process_count()
    rate, first_s, error = _measure(trainer, local_batch, batches, budget_s)
    # Every host reaches the gather, a failing one too (with no rate), or the others would wait.
    every = _every_host(rate if error is None else float("nan"))
    if error is not None:
        s.line(FAIL, error)
        return s
    s.figures.update(source=c.data.source, num_workers=c.data.num_workers,
                     first_batch_seconds=round(first_s, 2), clips_per_second=rate,
                     clips_per_second_per_host=every)
    if not all(np.isfinite(every)):
        s.line(FAIL, f"the input pipeline fails on host(s) "
                     f"{[i for i, r in enumerate(every) if not np.isfinite(r)]}")
        return s
    slowest = min(every)
    what = c.data.source if c.data.source == "synthetic" else f"shards ({c.data.train_shards})"
    text = (f"{slowest:.0f} clips/s on the slowest of {len(every)} host(s) from {what}, "
            f"num_workers {c.data.num_workers}; first batch after {first_s:.1f} s")
    if step_seconds is None:
        s.line(WARN, text + "; no step time to compare with (the step check failed)")
        return s
    need = local_batch / step_seconds
    ratio = slowest / need
    s.figures.update(needed_clips_per_second=need, ratio=ratio)
    text += f"; the step takes {need:.0f} clips/s per host ({ratio:.1f}x)"
    if ratio < HEADROOM:
        s.line(WARN, text + ": input-bound. Raise data.num_workers (-1: one per core), "
               "data.cycle_length or the shard count, or keep the shards in the TPU's region")
    else:
        s.line(OK, text)
    return s


def _measure(trainer: Any, local_batch: int, batches: int, budget_s: float
             ) -> tuple[float, float, str | None]:
    """(clips/s after the first batch, seconds to the first batch, the error if any)."""
    try:
        source = trainer.task.make_source()
    except Exception as e:  # noqa: BLE001 - a missing shard or bad manifest is the finding
        return 0.0, 0.0, f"the input pipeline does not start: {type(e).__name__}: {e}"
    try:
        t0 = time.perf_counter()
        source.next_local()  # the first batch also starts workers and fills buffers
        first_s = time.perf_counter() - t0
        rows, start = 0, time.perf_counter()
        while rows < batches * local_batch and (rows < 2 * local_batch
                                                 or time.perf_counter() - start < budget_s):
            audio, _ = source.next_local()
            rows += audio.shape[0]
        return rows / (time.perf_counter() - start), first_s, None
    except Exception as e:  # noqa: BLE001 - a damaged record is the finding
        return 0.0, 0.0, f"the input pipeline fails: {type(e).__name__}: {e}"
    finally:
        source.close()


def _every_host(rate: float) -> list[float]:
    if jax.process_count() == 1:
        return [rate]
    from jax.experimental import multihost_utils

    return [float(x) for x in np.asarray(
        multihost_utils.process_allgather(np.array([rate], np.float32))).reshape(-1)]
