"""Worker processes that parse, normalise and crop clips outside the training process.

Python threads share one interpreter lock, so clips parsed on threads of the training process
cap a host at about one core's worth, however many it has. ``mp_prefetch`` runs the per-clip
work in ``num_workers`` processes, each on its slice of the host's stream, and hands finished
elements to the training process through shared memory, taking them from the workers in a fixed
round-robin order (so the output is deterministic for a given number of workers).
"""

from __future__ import annotations

import os
import sys

import grain

# Past this, one more process buys little: a host's input rarely needs more cores than this,
# and each worker holds its own shuffle window and read buffers.
MAX_DEFAULT_WORKERS = 32
_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers(cores: int | None = None) -> int:
    """Workers for a host with ``cores`` cores: one per core, less one for the training process
    (which feeds the accelerators and runs the step), at most ``MAX_DEFAULT_WORKERS``; 0 (parse
    in process) on a single core, where a worker could only take turns with the trainer."""
    cores = available_cores() if cores is None else cores
    return max(0, min(cores - 1, MAX_DEFAULT_WORKERS))


def resolve_num_workers(value: int, cores: int | None = None) -> int:
    """The config's ``data.num_workers``: -1 means :func:`default_num_workers`; other negative
    values are an error; more workers than cores is allowed, with a warning (they only take
    turns, each holding its own shuffle window and read buffers)."""
    cores = available_cores() if cores is None else cores
    if value == -1:
        return default_num_workers(cores)
    if value < 0:
        raise ValueError(f"data.num_workers={value}: use -1 (one per core less one, here "
                         f"{default_num_workers(cores)}), 0 (parse in the training process) "
                         "or a positive count")
    if value > cores:
        import logging

        logging.getLogger(__name__).warning(
            "data.num_workers=%d on a host with %d cores: the workers take turns on the cores "
            "and each holds its own shuffle window and read buffers; -1 picks %d", value, cores,
            default_num_workers(cores))
    return value


def in_workers(ds: grain.IterDataset, num_workers: int, buffer_size: int = 2) -> grain.IterDataset:
    """``ds`` run in ``num_workers`` processes (0: unchanged, in this process)."""
    if num_workers <= 0:
        return ds
    from absl import flags

    # Batches still in flight when a run ends on an error or Ctrl-C are unlinked by
    # multiprocessing's resource tracker, which then warns of "leaked shared_memory objects"
    # after the error that ended the run. The tracker (started with the workers) inherits
    # this interpreter's warning options.
    if _QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(_QUIET_TRACKER)
    if not flags.FLAGS.is_parsed():
        # Grain reads its own absl flags when it starts workers; a program that is not an
        # absl app (a notebook, a test, a benchmark) has never parsed any: use the defaults.
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                       per_worker_buffer_size=buffer_size),
                          worker_init_fn=_die_with_parent)


def _die_with_parent(worker_index: int, num_workers: int) -> None:
    """A training process killed with SIGKILL (preemption, OOM, kill -9) cannot stop its
    workers; without this they would wait forever on a queue nobody reads. (The kernel's
    parent-death signal is no help: it follows the thread that started the worker, one of
    Grain's pool threads, not the process.)"""
    del worker_index, num_workers
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def explain_worker_death(error: BaseException, reading: str) -> RuntimeError | None:
    """A clearer error for Grain's "Worker process was terminated unexpectedly" (None for any
    other error): which signal, its usual cause, what the worker was reading, what to change."""
    import re
    import signal

    match = re.search(r"terminated unexpectedly with exit code (-?\d+)", str(error))
    if match is None:
        return None
    code = int(match.group(1))
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
        if code == -signal.SIGKILL:
            how += " (most often the kernel's out-of-memory killer: see dmesg)"
    else:
        how = f"exited with code {code}"
    return RuntimeError(
        f"an input worker process {how} while reading {reading}. Each worker holds its share "
        "of the shuffle window and its open shards: lower data.num_workers or "
        "data.shuffle_buffer, or set data.num_workers=0 to parse in the training process and "
        "see the error there")


_GRAIN_NOTE = "Grain has removed its internal frames"


def drop_grain_notes(error: BaseException) -> None:
    """Removes Grain's "internal frames removed" notes from ``error`` and its chain: Python
    prints notes after the message, so they would bury the real error under a banner."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        notes = getattr(error, "__notes__", None)
        if notes:
            kept = [n for n in notes if _GRAIN_NOTE not in n]
            if kept:
                error.__notes__ = kept
            else:
                del error.__notes__
        error = error.__cause__ or error.__context__
