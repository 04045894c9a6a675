"""The trainer's input pipeline: shards -> per-host Grain iterator -> globally sharded batches.

Per host (``process_index`` of ``process_count``):

1. the sorted shard list is dealt round-robin to hosts (whole shards; at least one per host);
2. the host's clips, epoch after epoch:
   * TFRecord (:mod:`mwmae.data.sequential`): each epoch the host's shards in an order drawn
     from ``(seed, epoch, host)``, read ``cycle_length`` at a time and interleaved record by
     record, then a window shuffle of ``shuffle_buffer`` clips
     (:class:`mwmae.data.sequential.WindowShuffle`: each window is filled, permuted with a seed
     of its own and drained, which lets a checkpoint rebuild a half-drained window exactly by
     re-reading it);
   * ArrayRecord (:mod:`mwmae.data.random_access`): every clip of the host read by index in a
     permutation drawn from ``(seed, host, epoch)``: a shuffle over all of them;
3. training: a random 200-frame crop whose start is a hash of (seed, epoch, shard, record),
   so it does not depend on thread timing, worker count or read order; evaluation: the centre
   crop;
4. parsing, normalising and cropping run in ``num_workers`` worker processes
   (:mod:`mwmae.data.workers`), each on its slice of step 2's stream, or on threads of this
   process when ``num_workers`` is 0;
5. batches of ``global_batch_size / process_count`` clips, remainder dropped, prefetched on a
   background thread;
6. ``jax.make_array_from_process_local_data`` into a global array sharded over the batch axes.

Training streams run epoch after epoch (a batch may straddle two); evaluation makes one pass,
cut to the same number of batches on every host (so no host waits in a collective for a batch
another host never makes).

The whole position is ``get_state()``: per worker, the next shard of the schedule and the
per-shard record offsets plus the shuffle window's start and progress (TFRecord) or the next
index (ArrayRecord), and the count of records skipped up to that position (per worker when the
workers batch; see :mod:`mwmae.data.errors`). Restoring it with ``set_state()`` on a freshly built
iterator (same shards, config, host layout and number of workers) continues with exactly the
batches an uninterrupted run would produce, and the count with exactly its figures.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from mwmae.data import random_access, sequential, shards
from mwmae.data import workers as workers_lib
from mwmae.data.errors import CountSkippedIterDataset, ErrorReport, summarize

log = logging.getLogger(__name__)

STATE_VERSION = 2
ON_ERROR = ("raise", "skip")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the input pipeline does; everything that changes which batches come out is here."""

    global_batch_size: int
    train: bool = True
    seed: int = 0
    crop_frames: int = 200
    n_mels: int = 80
    # Clips per shuffle window per host (TFRecord; split evenly over the workers). Memory:
    # window x 64 KB for 200x80 crops. ArrayRecord shuffles over every clip and ignores it.
    shuffle_buffer: int = 1024
    # Per worker (or per host when num_workers is 0): TFRecord shards read at once, each by
    # its own thread; ArrayRecord reader threads.
    cycle_length: int = 4
    # Processes that parse, normalise and crop; 0: threads of this process. The batches come
    # out the same for the same (seed, hosts, workers); a different count gives other batches.
    num_workers: int = 0
    # None: endless when training, one pass when evaluating.
    num_epochs: int | None = None
    prefetch_batches: int = 2
    # Labels as int32 [max_labels] padded with -1, or multi-hot float32 when num_classes is set.
    max_labels: int = 32
    num_classes: int | None = None
    # "raise": stop with an error naming the file and record. "skip": log it, skip the record
    # (or the rest of a shard whose stream is damaged) and count it in `InputIterator.errors`
    # once the run has consumed the place in the stream where the record was.
    on_error: str = "raise"
    tfrecord_compression: str | None = "zlib"
    # Class-balanced sampling (training, ArrayRecord shards): the shard builder's
    # PREFIX-clip-labels.csv; clips drawn with replacement, weighted by their labels' rarity.
    balanced_labels: str | None = None

    def __post_init__(self):
        if self.global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.cycle_length < 1 or self.prefetch_batches < 0 or self.crop_frames < 1:
            raise ValueError("cycle_length >= 1, prefetch_batches >= 0 and crop_frames >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError("num_epochs must be >= 1 or None")

    @property
    def epochs(self) -> int | None:
        if self.num_epochs is not None:
            return self.num_epochs
        return None if self.train else 1


def host_dataset(
    host_shards: Sequence[tuple[int, shards.Shard]],
    config: PipelineConfig,
    *,
    local_batch_size: int,
    process_index: int = 0,
) -> grain.IterDataset:
    """The Grain dataset of one host: batches of ``local_batch_size`` prepared clips.

    ``host_shards`` pairs each shard with a key that is stable across hosts (its index in the
    global sorted list), which seeds its crops. ArrayRecord shards are read by index with a
    shuffle over all the host's clips (:mod:`mwmae.data.random_access`); TFRecord shards (or a
    mix) front to back, interleaved (:mod:`mwmae.data.sequential`).
    """
    ds = _unprefetched(host_shards, config, local_batch_size=local_batch_size,
                       process_index=process_index)
    if config.prefetch_batches > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(
            ds, prefetch_buffer_size=config.prefetch_batches
        )
    return ds


def _unprefetched(host_shards: Sequence[tuple[int, shards.Shard]], config: PipelineConfig, *,
                  local_batch_size: int, process_index: int) -> grain.IterDataset:
    host_shards = list(host_shards)
    workers = config.num_workers
    if config.balanced_labels and not all(s.format == shards.ARRAY_RECORD
                                          for _, s in host_shards):
        raise ValueError("balanced sampling draws clips by index, which needs ArrayRecord shards "
                         f"(random access); {host_shards[0][1].path} is not one: rebuild with "
                         "tfrecord_tools.build --format array_record")
    if all(s.format == shards.ARRAY_RECORD for _, s in host_shards):
        ds = random_access.clip_stream(host_shards, config, process_index=process_index,
                                       epochs=config.epochs, read_threads=config.cycle_length)
    else:
        # The shuffle memory is per host: each worker keeps its share of the window.
        window = config.shuffle_buffer // max(1, workers)
        ds = sequential.clip_stream(host_shards, config, process_index=process_index,
                                    epochs=config.epochs, window=window, workers=workers)
    # The skip markers are counted right under the batcher, which takes clips only as it needs
    # them: each batch's state then counts the skips up to its last clip, whatever was read
    # ahead below.
    if config.epochs is None:
        # Endless: workers batch (one transfer per batch, not per clip).
        ds = CountSkippedIterDataset(ds).batch(local_batch_size, drop_remainder=True)
        ds = workers_lib.in_workers(ds, workers)
    else:
        # A finite pass: batch once, after the workers, so only one remainder is dropped and
        # every host can count its batches from the record counts alone. (The markers cross
        # to this process like clips.)
        ds = workers_lib.in_workers(ds, workers)
        ds = CountSkippedIterDataset(ds).batch(local_batch_size, drop_remainder=True)
    return ds


def _json_safe(state: Any) -> Any:
    return json.loads(json.dumps(state, default=lambda o: o.item() if hasattr(o, "item") else o))


class InputIterator:
    """This host's rows of each global batch, ``{"audio": (B / hosts, crop, mels, 1) float32,
    "label": ...}`` as numpy (:func:`mwmae.data.to_global` makes the global arrays).

    ``label`` is int32 ``(B, max_labels)`` padded with -1, or multi-hot float32
    ``(B, num_classes)`` when ``config.num_classes`` is set. Use :func:`make_input_iterator`.
    """

    def __init__(
        self,
        all_shards: Sequence[shards.Shard],
        config: PipelineConfig,
        *,
        process_index: int,
        process_count: int,
        max_batches: int | None = None,
    ):
        if config.global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} is not divisible by "
                f"{process_count} processes"
            )
        self.config = config
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = config.global_batch_size // process_count
        self.shards = list(all_shards)
        keyed = list(enumerate(self.shards))
        self.host_shards = [s for _, s in shards.for_host(keyed, process_index, process_count)]
        self.max_batches = max_batches
        self._batches = 0
        # Prefetched here rather than in host_dataset: once the stream has ended, the
        # iterator under the prefetch thread holds the final position (the skips after the last
        # batch included), which the prefetch's state, that of the last batch, does not.
        self._inner = iter(_unprefetched(
            shards.for_host(keyed, process_index, process_count), config,
            local_batch_size=self.local_batch_size, process_index=process_index))
        self._it = self._inner
        if config.prefetch_batches > 0:
            self._it = grain.experimental.ThreadPrefetchDatasetIterator(
                self._inner, config.prefetch_batches)
        self._ended = False
        # Also at interpreter exit (Ctrl-C, an error in the step loop): stops the worker
        # processes and frees the shared memory of batches in flight, which would otherwise be
        # reported as leaked after the error that ended the run.
        self._closer = weakref.finalize(self, _close_quietly, self._it)

    @property
    def errors(self) -> ErrorReport:
        """Records skipped (``on_error="skip"``) up to the position consumed: those passed over
        before the last clip of the last batch drawn (after the end of a pass: all of them),
        not those that reading ahead has met. Summed over this host's workers; restored with
        the position, so after a resume it includes the skips before the checkpoint."""
        return summarize(self._grain_state())

    def _grain_state(self) -> dict[str, Any]:
        # After the end the prefetch thread has stopped, so the iterator under it is at rest.
        return self._inner.get_state() if self._ended else self._it.get_state()

    def __iter__(self) -> InputIterator:
        return self

    def next_local(self) -> dict[str, np.ndarray]:
        """This host's part of the next batch, as numpy (no device transfer)."""
        if self.max_batches is not None and self._batches >= self.max_batches:
            raise StopIteration
        try:
            batch = next(self._it)
        except StopIteration:
            self._ended = True
            raise
        except Exception as e:
            workers_lib.drop_grain_notes(e)  # so the error itself is the last line printed
            clearer = workers_lib.explain_worker_death(
                e, f"{len(self.host_shards)} shard(s) such as {self.host_shards[0].path}")
            if clearer is None:
                raise
            raise clearer from e
        self._batches += 1
        return batch

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_local()

    def get_state(self) -> dict[str, Any]:
        """The position, JSON-serialisable; restore it with :meth:`set_state`."""
        return _json_safe({
            "version": STATE_VERSION,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "num_shards": len(self.shards),
            "num_workers": self.config.num_workers,
            "batches": self._batches,
            "grain": self._grain_state(),
        })

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"input state version {state.get('version')} != {STATE_VERSION}: "
                             "it was saved by another version of the input pipeline")
        if state["num_workers"] != self.config.num_workers:
            raise ValueError(
                f"input state was saved with data.num_workers={state['num_workers']}, this "
                f"iterator has {self.config.num_workers}: each worker reads its own slice, so "
                f"the position only restores with the same count (set "
                f"--config.data.num_workers={state['num_workers']})")
        expected = (self.process_index, self.process_count, len(self.shards))
        got = (state["process_index"], state["process_count"], state["num_shards"])
        if got != expected:
            raise ValueError(
                f"input state was saved as host {got[0]} of {got[1]} over {got[2]} shards; "
                f"this iterator is host {expected[0]} of {expected[1]} over {expected[2]}"
            )
        self._it.set_state(copy.deepcopy(state["grain"]))
        self._batches = int(state["batches"])
        self._ended = False

    def close(self) -> None:
        self._closer()


def _close_quietly(it: Any) -> None:
    try:
        it.close()
    except Exception:  # noqa: BLE001 - at exit, after the error that matters
        log.debug("closing the input iterator failed", exc_info=True)


def make_input_iterator(
    source: str | Sequence[str],
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> InputIterator:
    """The trainer's iterator over shards named by a manifest CSV, glob(s) or path(s): this
    host's numpy rows of each batch. Process index and count default to jax's."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    all_shards = shards.resolve(source)
    # Every host checks every shard, so all of them refuse (or go ahead) alike.
    shards.check_shards(all_shards, compression=config.tfrecord_compression,
                        on_error=config.on_error)
    max_batches = None
    if config.epochs is not None and process_count > 1:
        max_batches = _common_batches(all_shards, config, process_count)
    return InputIterator(all_shards, config, process_index=process_index,
                         process_count=process_count, max_batches=max_batches)


def _common_batches(all_shards: list[shards.Shard], config: PipelineConfig,
                    process_count: int) -> int:
    """Batches every host can make in a finite run (the smallest host's count)."""
    counts = []
    for shard in all_shards:
        if shard.num_records is None:
            log.warning("counting records of %s (a manifest lists the counts)", shard.path)
            counts.append(shards.count_records(shard, compression=config.tfrecord_compression))
        else:
            counts.append(shard.num_records)
    local_batch = config.global_batch_size // process_count
    per_host = [sum(counts[i::process_count]) for i in range(process_count)]
    return min(n * config.epochs // local_batch for n in per_host)
