"""Shards read front to back (TFRecord): a stream of (epoch, shard) -> interleave -> window shuffle.

The host's shards, put in an order drawn from ``(seed, epoch, host)`` for every epoch, form one
endless :class:`ShardSchedule` (a Grain ``MapDataset`` whose element ``i`` is epoch
``i // num_shards``). ``InterleaveIterDataset`` reads ``cycle_length`` of them at a time, record
by record; when a shard ends, its slot takes the next one in the schedule, which near an epoch's
end is already a shard of the next epoch. So no reader slot idles at epoch boundaries, and each
clip is still read exactly once per epoch. (A worker reads at most as many shards at once as it
gets per epoch, so a shard is never read beside its own next-epoch pass.)

A record skipped under ``on_error="skip"`` leaves a marker in its place
(:class:`mwmae.data.errors.Skipped`) that takes a place in the interleave and in the shuffle window
like a clip, so it is counted when the run consumes that place, not when it is read.

Worker processes (``mp_prefetch``) slice the schedule: worker ``w`` of ``N`` reads schedule
elements ``w, w + N, ...``. Every shard of every epoch is read by exactly one worker, and the
batches that come out depend only on (seed, hosts, workers).
"""

from __future__ import annotations

import copy
import sys
import threading
from typing import Any

import grain
import numpy as np

from mwmae.data import clips, shards
from mwmae.data.errors import Skipped, known, known_records, skipped
from mwmae.data.records import RecordError, decode_example


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Preparer:
    """Serialized Example -> model input; training crops keyed by (seed, epoch, shard, record),
    so they do not depend on thread timing, worker count or read order."""

    def __init__(self, config: Any):
        self._config = config

    def __call__(self, raw: bytes, epoch: int, key: int, index: int) -> dict[str, np.ndarray]:
        cfg = self._config
        logmel, labels = decode_example(raw)
        crop = clips.crop_key(cfg.seed, epoch, key, index) if cfg.train else None
        return {
            "audio": clips.prepare_audio(logmel, crop_frames=cfg.crop_frames, n_mels=cfg.n_mels,
                                         crop=crop),
            "label": clips.format_labels(labels, max_labels=cfg.max_labels,
                                         num_classes=cfg.num_classes),
        }


class _EmptyGuard:
    """Endless training over shards that yield nothing would spin forever: count shards that
    end without a clip, in a row, in this process."""

    def __init__(self, limit: int):
        self._limit, self._streak = limit, 0
        self._lock = threading.Lock()

    def shard_ended(self, path: str, yielded: int) -> None:
        with self._lock:
            self._streak = 0 if yielded else self._streak + 1
            if self._streak >= self._limit:
                raise RuntimeError(
                    f"{self._streak} shards in a row produced no clips (the last: {path}): the "
                    "host's shards are empty or every record was skipped as unreadable")

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self._limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limit"])


class _ShardIterator(grain.DatasetIterator):
    """Records of one shard, decoded and prepared, or a :class:`Skipped` marker in place of what
    could not be used (``on_error="skip"``); the state is the next record's index.

    Each call yields one thing for exactly the records its state moves past, and reads nothing
    ahead, so a restore neither repeats nor drops a clip or a marker.
    """

    def __init__(self, shard: shards.Shard, key: int, epoch: int, config: Any,
                 guard: _EmptyGuard):
        super().__init__()
        self._shard, self._key, self._epoch = shard, key, epoch
        self._config, self._guard = config, guard
        self._prepare = Preparer(config)
        self._next = 0
        self._yielded = 0
        self._done = False
        self._reader = None

    def _skip(self, index: int, error: Exception, records: int = 1, *,
              ends_shard: bool = False) -> Skipped:
        if self._config.on_error == "raise":
            message = str(error)
            if self._shard.path not in message:
                message = f"{self._shard.path}: record {index}: {message}"
            raise RecordError(message) from error
        return skipped(self._shard.path, index, str(error), records, ends_shard=ends_shard)

    def _shortfall(self) -> Skipped | None:
        # A shard cut at a record boundary reads cleanly: only the manifest's count shows it.
        listed = self._shard.num_records
        if listed is None or self._next == listed:
            return None
        error = RecordError(f"{self._shard.path}: {self._next} records, the manifest lists "
                            f"{listed}")
        return self._skip(self._next, error, records=max(0, listed - self._next),
                          ends_shard=True)

    def __next__(self) -> dict[str, np.ndarray] | Skipped:
        if not self._done:
            index = self._next
            # What this process already skipped here (an earlier epoch, or before a restore)
            # is skipped again as it was, without reading or decoding it again.
            skipping = self._config.on_error == "skip"
            remembered = known(self._shard.path, index) if skipping else None
            if remembered is not None and remembered[1]:
                # The stream broke off here (or the shard ran short): nothing more to read.
                self._done = True
                self._close_reader()
                return remembered[0]
            if self._reader is None:
                self._reader = shards.iter_records(
                    self._shard, start=self._next, compression=self._config.tfrecord_compression,
                    passing=known_records(self._shard.path) if skipping else ())
            try:
                raw = next(self._reader)
            except StopIteration:
                self._done = True
                self._close_reader()
                marker = self._shortfall()
                if marker is not None:
                    return marker
            except (RecordError, OSError) as e:
                # The stream itself is damaged or gone: nothing after this point is readable.
                self._done = True
                self._close_reader()
                listed = self._shard.num_records
                return self._skip(index, e, records=max(1, listed - index) if listed else 1,
                                  ends_shard=True)
            else:
                self._next += 1
                if remembered is not None:
                    return remembered[0]
                if raw is None:  # passed over as known, then forgotten: still unusable
                    return self._skip(index, RecordError("skipped earlier in this process"))
                try:
                    element = self._prepare(raw, self._epoch, self._key, index)
                except (RecordError, ValueError) as e:
                    return self._skip(index, e)
                self._yielded += 1
                return element
        self._close_reader()
        if self._config.train:
            self._guard.shard_ended(self._shard.path, self._yielded)
            self._yielded = 1  # count an ended shard once, however often it is asked
        raise StopIteration

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def get_state(self) -> dict[str, int]:
        return {"record": self._next, "done": int(self._done)}

    def set_state(self, state: dict[str, int]) -> None:
        self._close_reader()
        self._next = int(state["record"])
        self._done = bool(state["done"])
        self._yielded = int(self._next > 0)

    def close(self) -> None:
        self._close_reader()
        super().close()


class _ShardDataset(grain.IterDataset):
    def __init__(self, *args: Any):
        super().__init__()
        self._args = args

    def __iter__(self) -> _ShardIterator:
        return _ShardIterator(*self._args)

    def __str__(self) -> str:
        return f"_ShardDataset({self._args[0].path}, epoch {self._args[2]})"


class ShardSchedule(grain.MapDataset):
    """Element ``i``: shard ``order(epoch)[i % n]`` of epoch ``i // n``, as a dataset of its clips.

    Endless when ``epochs`` is None (its length is then ``sys.maxsize``).
    """

    def __init__(self, host_shards: list[tuple[int, shards.Shard]], config: Any,
                 process_index: int, epochs: int | None):
        super().__init__()
        self._shards, self._config, self._host = list(host_shards), config, process_index
        self._epochs = epochs
        self._guard = _EmptyGuard(max(8, 2 * len(self._shards)))
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        n = len(self._shards)
        return sys.maxsize if self._epochs is None else n * self._epochs

    def order(self, epoch: int) -> np.ndarray:
        if not self._config.train:
            return np.arange(len(self._shards))
        cached = self._cached
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng(seed_of(self._config.seed, epoch, self._host, 1))
            cached = self._cached = (epoch, rng.permutation(len(self._shards)))
        return cached[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(int(index), len(self._shards))
        key, shard = self._shards[int(self.order(epoch)[position])]
        return _ShardDataset(shard, key, epoch, self._config, self._guard)

    def __str__(self) -> str:
        return f"ShardSchedule({len(self._shards)} shards, epochs={self._epochs})"


class _WindowShuffleIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, size: int, seed: int):
        super().__init__(parent)
        self._size, self._seed = size, seed
        self._window = 0  # windows drained so far
        self._taken = 0  # elements taken from the current one
        self._pending: list[Any] = []  # its elements still to come, the next one last
        self._start = parent.get_state()  # the parent's state where the current window began
        self._exhausted = False

    def _fill(self) -> None:
        elements = []
        while len(elements) < self._size:
            try:
                elements.append(next(self._parent))
            except StopIteration:
                self._exhausted = True
                break
        order = np.random.default_rng([self._seed, self._window]).permutation(len(elements))
        self._pending = [elements[i] for i in order[::-1]]

    def __next__(self) -> Any:
        if not self._pending:
            if self._exhausted:
                raise StopIteration
            self._start = self._parent.get_state()
            self._taken = 0
            self._fill()
            if not self._pending:
                raise StopIteration
        self._taken += 1
        element = self._pending.pop()
        if not self._pending:
            self._window += 1
        return element

    def get_state(self) -> dict[str, Any]:
        if not self._pending:  # between windows: nothing to re-read on restore
            return {"start": self._parent.get_state(), "window": self._window, "taken": 0}
        return {"start": copy.deepcopy(self._start), "window": self._window,
                "taken": self._taken}

    def set_state(self, state: dict[str, Any]) -> None:
        self._start = copy.deepcopy(state["start"])
        self._parent.set_state(self._start)
        self._window, self._taken = int(state["window"]), int(state["taken"])
        self._exhausted, self._pending = False, []
        if self._taken:  # mid-window: read it again, drop what was already taken
            self._fill()
            del self._pending[len(self._pending) - self._taken:]


class WindowShuffle(grain.IterDataset):
    """Fills a window of ``size`` elements, yields it in an order drawn from ``(seed, window
    number)``, then the next. The state is where the window began in the parent plus how many
    of it were taken, so a restore re-reads the window and continues exactly.

    (Grain's ``WindowShuffleIterDataset`` does the same, but draws each position with a call
    that cost ~30-100 us per element here, a tenth of a clip's whole preparation.)
    """

    def __init__(self, parent: grain.IterDataset, size: int, seed: int):
        super().__init__(parent)
        self._size, self._seed = size, seed

    def __iter__(self) -> _WindowShuffleIterator:
        return _WindowShuffleIterator(self._parent.__iter__(), self._size, self._seed)

    def __str__(self) -> str:
        return f"WindowShuffle(size={self._size})"


def clip_stream(host_shards: list[tuple[int, shards.Shard]], config: Any, *,
                process_index: int, epochs: int | None, window: int,
                workers: int) -> grain.IterDataset:
    """Prepared clips of one host (or, once sliced, one of ``workers`` workers), epoch after
    epoch, with a :class:`Skipped` marker in place of each record skipped."""
    schedule = ShardSchedule(host_shards, config, process_index, epochs)
    # A worker never reads more shards at once than it gets per epoch: otherwise it would
    # read a shard of epoch e beside the same shard of epoch e + 1 (the same clips in one
    # window). So epochs overlap only where one shard's tail meets the next epoch's first.
    per_worker = max(1, len(host_shards) // max(1, workers))
    ds: grain.IterDataset = grain.experimental.InterleaveIterDataset(
        schedule, cycle_length=min(config.cycle_length, per_worker), iter_buffer_size=2)
    if config.train and window > 1:
        ds = WindowShuffle(ds, window, seed_of(config.seed, process_index, 2))
    return ds
