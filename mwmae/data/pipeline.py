"""The trainer's input pipeline: shards -> per-host Grain iterator -> globally sharded batches.

Per host (``process_index`` of ``process_count``):

1. the sorted shard list is dealt round-robin to hosts (whole shards; at least one per host);
2. each epoch the host's shards are put in an order drawn from ``(seed, epoch, host)`` and
   read ``cycle_length`` at a time, interleaved record by record, each shard on its own thread
   (parse, normalise and crop happen on those threads);
3. training: a random 200-frame crop whose randomness is keyed by (seed, epoch, shard,
   record), so it does not depend on thread timing; evaluation: the centre crop;
4. training: a window shuffle of ``shuffle_buffer`` clips (Grain's ``WindowShuffleIterDataset``:
   each window is filled, permuted with a seed of its own and drained, which lets a checkpoint
   rebuild a half-drained window exactly by re-reading it);
5. batches of ``global_batch_size / process_count`` clips, remainder dropped, prefetched on a
   background thread;
6. ``jax.make_array_from_process_local_data`` into a global array sharded over the batch axes.

Training streams run epoch after epoch (a batch may straddle two); evaluation makes one pass,
cut to the same number of batches on every host (so no host waits in a collective for a batch
another host never makes).

The whole position is ``get_state()``: epoch, per-shard record offsets, the shuffle window's
start and progress. Restoring it with ``set_state()`` on a freshly built iterator (same shards,
config and host layout) continues with exactly the batches an uninterrupted run would produce.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from mwmae.data import clips, shards
from mwmae.data.records import RecordError, decode_example

log = logging.getLogger(__name__)

STATE_VERSION = 1
ON_ERROR = ("raise", "skip")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the input pipeline does; everything that changes which batches come out is here."""

    global_batch_size: int
    train: bool = True
    seed: int = 0
    crop_frames: int = 200
    n_mels: int = 80
    # Clips per shuffle window (per host). Memory: window x 64 KB for 200x80 crops.
    shuffle_buffer: int = 1024
    # Shards read at once per host, each by its own thread.
    cycle_length: int = 4
    # None: endless when training, one pass when evaluating.
    num_epochs: int | None = None
    prefetch_batches: int = 2
    # Labels as int32 [max_labels] padded with -1, or multi-hot float32 when num_classes is set.
    max_labels: int = 32
    num_classes: int | None = None
    # "raise": stop with an error naming the file and record. "skip": log it, count it in
    # `InputIterator.errors`, skip the record (or the rest of a shard whose stream is damaged).
    on_error: str = "raise"
    tfrecord_compression: str | None = "zlib"

    def __post_init__(self):
        if self.global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.cycle_length < 1 or self.prefetch_batches < 0 or self.crop_frames < 1:
            raise ValueError("cycle_length >= 1, prefetch_batches >= 0 and crop_frames >= 1")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError("num_epochs must be >= 1 or None")

    @property
    def epochs(self) -> int | None:
        if self.num_epochs is not None:
            return self.num_epochs
        return None if self.train else 1


class ErrorLog:
    """Records skipped under ``on_error="skip"``; shared by the reader threads.

    ``skipped_records`` counts the records lost: one per damaged record; for a shard whose
    stream breaks off (or that vanished) the rest of it, when a manifest gives its length, else
    one.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.entries: list[tuple[str, int, str]] = []
        self.skipped_records = 0

    def add(self, path: str, record: int, reason: str, records: int = 1) -> None:
        log.warning("skipping %s record %d: %s", path, record, reason)
        with self._lock:
            self.entries.append((path, record, reason))
            self.skipped_records += records

    def __len__(self) -> int:
        return len(self.entries)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ----------------------------------------------------------------------------- grain pieces


class _ShardIterator(grain.DatasetIterator):
    """Records of one shard, decoded and prepared; the state is the next record's index."""

    def __init__(self, shard: shards.Shard, key: int, epoch: int, config: PipelineConfig,
                 errors: ErrorLog):
        super().__init__()
        self._shard, self._key, self._epoch = shard, key, epoch
        self._config, self._errors = config, errors
        self._next = 0
        self._done = False
        self._reader = None

    def _fail(self, index: int, error: Exception, records: int = 1) -> None:
        if self._config.on_error == "raise":
            message = str(error)
            if self._shard.path not in message:
                message = f"{self._shard.path}: record {index}: {message}"
            raise RecordError(message) from error
        self._errors.add(self._shard.path, index, str(error), records)

    def _check_count(self) -> None:
        # A shard cut at a record boundary reads cleanly: only the manifest's count shows it.
        listed = self._shard.num_records
        if listed is None or self._next == listed:
            return
        error = RecordError(f"{self._shard.path}: {self._next} records, the manifest lists "
                            f"{listed}")
        self._fail(self._next, error, records=max(0, listed - self._next))

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._done:
            if self._reader is None:
                self._reader = shards.iter_records(
                    self._shard, start=self._next, compression=self._config.tfrecord_compression
                )
            index = self._next
            try:
                raw = next(self._reader)
            except StopIteration:
                self._done = True
                self._check_count()
                break
            except (RecordError, OSError) as e:
                # The stream itself is damaged or gone: nothing after this point is readable.
                self._done = True
                self._close_reader()
                listed = self._shard.num_records
                self._fail(index, e, records=max(1, listed - index) if listed else 1)
                break
            self._next += 1
            try:
                return self._prepare(raw, index)
            except (RecordError, ValueError) as e:
                self._fail(index, e)
        raise StopIteration

    def _prepare(self, raw: bytes, index: int) -> dict[str, np.ndarray]:
        cfg = self._config
        logmel, labels = decode_example(raw)
        rng = None
        if cfg.train:
            rng = np.random.default_rng([cfg.seed, self._epoch, self._key, index])
        return {
            "audio": clips.prepare_audio(logmel, crop_frames=cfg.crop_frames, n_mels=cfg.n_mels,
                                         rng=rng),
            "label": clips.format_labels(labels, max_labels=cfg.max_labels,
                                         num_classes=cfg.num_classes),
        }

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

    def close(self) -> None:
        self._close_reader()
        super().close()


class _ShardDataset(grain.IterDataset):
    def __init__(self, shard: shards.Shard, key: int, epoch: int, config: PipelineConfig,
                 errors: ErrorLog):
        super().__init__()
        self._args = (shard, key, epoch, config, errors)

    def __iter__(self) -> _ShardIterator:
        return _ShardIterator(*self._args)

    def __str__(self) -> str:
        return f"_ShardDataset({self._args[0].path})"


class _EpochsIterator(grain.DatasetIterator):
    """Epoch after epoch of a per-epoch dataset; the state is (epoch, that epoch's state)."""

    def __init__(self, make_epoch: Callable[[int], grain.IterDataset], epochs: int | None):
        super().__init__()
        self._make_epoch, self._epochs = make_epoch, epochs
        self._epoch = 0
        self._inner: grain.DatasetIterator | None = None
        self._yielded_in_epoch = 0

    def __next__(self):
        while self._epochs is None or self._epoch < self._epochs:
            if self._inner is None:
                self._inner = iter(self._make_epoch(self._epoch))
                self._yielded_in_epoch = 0
            try:
                element = next(self._inner)
            except StopIteration:
                empty = self._yielded_in_epoch == 0
                self._inner.close()
                self._inner = None
                if empty:
                    # Endless training over nothing would spin forever.
                    raise RuntimeError(
                        f"epoch {self._epoch} produced no clips: every shard of this host is "
                        "empty or was skipped as unreadable"
                    ) from None
                self._epoch += 1
                continue
            self._yielded_in_epoch += 1
            return element
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        inner = None if self._inner is None else self._inner.get_state()
        return {"epoch": self._epoch, "epoch_state": inner,
                "yielded_in_epoch": self._yielded_in_epoch}

    def set_state(self, state: dict[str, Any]) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        self._epoch = int(state["epoch"])
        self._yielded_in_epoch = int(state.get("yielded_in_epoch", 0))
        if state["epoch_state"] is not None:
            self._inner = iter(self._make_epoch(self._epoch))
            self._inner.set_state(copy.deepcopy(state["epoch_state"]))

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        super().close()


class _EpochsDataset(grain.IterDataset):
    def __init__(self, make_epoch: Callable[[int], grain.IterDataset], epochs: int | None):
        super().__init__()
        self._make_epoch, self._epochs = make_epoch, epochs

    def __iter__(self) -> _EpochsIterator:
        return _EpochsIterator(self._make_epoch, self._epochs)


# ----------------------------------------------------------------------------- host pipeline


def host_dataset(
    host_shards: Sequence[tuple[int, shards.Shard]],
    config: PipelineConfig,
    *,
    local_batch_size: int,
    process_index: int = 0,
    errors: ErrorLog | None = None,
) -> grain.IterDataset:
    """The Grain dataset of one host: batches of ``local_batch_size`` prepared clips.

    ``host_shards`` pairs each shard with a key that is stable across hosts (its index in the
    global sorted list), which seeds its crops.
    """
    errors = errors if errors is not None else ErrorLog()
    host_shards = list(host_shards)

    def make_epoch(epoch: int) -> grain.IterDataset:
        order = list(host_shards)
        if config.train:
            perm = np.random.default_rng(_seed(config.seed, epoch, process_index, 1)).permutation(
                len(order)
            )
            order = [order[i] for i in perm]
        datasets = [_ShardDataset(shard, key, epoch, config, errors) for key, shard in order]
        ds: grain.IterDataset = grain.experimental.InterleaveIterDataset(
            datasets, cycle_length=min(config.cycle_length, len(datasets)), iter_buffer_size=2
        )
        if config.train and config.shuffle_buffer > 1:
            ds = grain.experimental.WindowShuffleIterDataset(
                ds, window_size=config.shuffle_buffer,
                seed=_seed(config.seed, epoch, process_index, 2) % (1 << 31),
            )
        return ds

    ds: grain.IterDataset = _EpochsDataset(make_epoch, config.epochs)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    if config.prefetch_batches > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(
            ds, prefetch_buffer_size=config.prefetch_batches
        )
    return ds


def _json_safe(state: Any) -> Any:
    return json.loads(json.dumps(state, default=lambda o: o.item() if hasattr(o, "item") else o))


class InputIterator:
    """Global batches ``{"audio": (B, crop, mels, 1) float32, "label": ...}`` as jax Arrays.

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
        sharding: Any = None,
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
        self.errors = ErrorLog()
        self._sharding = sharding
        self.max_batches = max_batches
        self._batches = 0
        self._dataset = host_dataset(
            shards.for_host(keyed, process_index, process_count), config,
            local_batch_size=self.local_batch_size, process_index=process_index,
            errors=self.errors,
        )
        self._it = iter(self._dataset)

    def __iter__(self) -> InputIterator:
        return self

    def next_local(self) -> dict[str, np.ndarray]:
        """This host's part of the next batch, as numpy (no device transfer)."""
        if self.max_batches is not None and self._batches >= self.max_batches:
            raise StopIteration
        batch = next(self._it)
        self._batches += 1
        return batch

    def __next__(self) -> dict[str, Any]:
        local = self.next_local()
        if self._sharding is None:
            return local
        return to_global(local, self._sharding, self.config.global_batch_size)

    def get_state(self) -> dict[str, Any]:
        """The position, JSON-serialisable; restore it with :meth:`set_state`."""
        return _json_safe({
            "version": STATE_VERSION,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "num_shards": len(self.shards),
            "batches": self._batches,
            "grain": self._it.get_state(),
        })

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"input state version {state.get('version')} != {STATE_VERSION}")
        expected = (self.process_index, self.process_count, len(self.shards))
        got = (state["process_index"], state["process_count"], state["num_shards"])
        if got != expected:
            raise ValueError(
                f"input state was saved as host {got[0]} of {got[1]} over {got[2]} shards; "
                f"this iterator is host {expected[0]} of {expected[1]} over {expected[2]}"
            )
        self._it.set_state(copy.deepcopy(state["grain"]))
        self._batches = int(state["batches"])

    def close(self) -> None:
        self._it.close()


def batch_sharding(sharding: Any = None, *, mesh: Any = None,
                   batch_axes: str | Sequence[str] | None = None) -> Any:
    """A NamedSharding that splits dim 0 over ``batch_axes`` of ``mesh`` (or the given one)."""
    from jax.sharding import NamedSharding, PartitionSpec

    if sharding is not None:
        return sharding
    if mesh is None or batch_axes is None:
        raise ValueError("pass a NamedSharding, or a mesh and its batch axis name(s)")
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    return NamedSharding(mesh, PartitionSpec(axes))


def to_global(local: dict[str, np.ndarray], sharding: Any, global_batch_size: int) -> dict:
    """Assembles each host's rows into global arrays split over the batch dimension."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    batch_spec = PartitionSpec(sharding.spec[0] if len(sharding.spec) else None)
    row_sharding = NamedSharding(sharding.mesh, batch_spec)
    out = {}
    for name, value in local.items():
        shape = (global_batch_size,) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(row_sharding, value, shape)
    return out


def _check_rows_per_process(sharding: Any, global_batch_size: int, process_count: int) -> None:
    # Each host supplies global/process_count distinct rows; a sharding that gives two hosts
    # the same rows (batch axes not spanning the hosts) would need the same data on both.
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    rows_only = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:1]))
    local_rows: set[tuple[int, int]] = set()
    for index in rows_only.addressable_devices_indices_map((global_batch_size,)).values():
        rows = index[0]
        local_rows.add((rows.start or 0, global_batch_size if rows.stop is None else rows.stop))
    covered = sum(stop - start for start, stop in local_rows)
    expected = global_batch_size // process_count
    if covered != expected:
        raise ValueError(
            f"the batch sharding gives process {jax.process_index()} {covered} of "
            f"{global_batch_size} rows, not {expected}: the batch axes must span all "
            f"{process_count} processes evenly"
        )


def make_input_iterator(
    source: str | Sequence[str],
    config: PipelineConfig,
    *,
    sharding: Any = None,
    mesh: Any = None,
    batch_axes: str | Sequence[str] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    as_numpy: bool = False,
) -> InputIterator:
    """The trainer's iterator over shards named by a manifest CSV, glob(s) or path(s).

    ``sharding`` (a NamedSharding whose spec's first entry names the batch axes) or ``mesh`` +
    ``batch_axes`` say how the global batch is laid out; ``as_numpy=True`` yields this host's
    numpy part instead (no jax arrays). Process index and count default to jax's.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    all_shards = shards.resolve(source)
    target = None
    if not as_numpy:
        target = batch_sharding(sharding, mesh=mesh, batch_axes=batch_axes)
        batch_devices = int(np.prod([target.mesh.shape[a] for a in _axes(target.spec)]))
        if config.global_batch_size % batch_devices:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} is not divisible by the "
                f"{batch_devices} devices of the batch axes"
            )
        _check_rows_per_process(target, config.global_batch_size, process_count)
    max_batches = None
    if config.epochs is not None and process_count > 1:
        max_batches = _common_batches(all_shards, config, process_count)
    return InputIterator(all_shards, config, process_index=process_index,
                         process_count=process_count, sharding=target, max_batches=max_batches)


def _axes(spec: Any) -> tuple[str, ...]:
    first = spec[0] if len(spec) else None
    if first is None:
        return ()
    return (first,) if isinstance(first, str) else tuple(first)


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
