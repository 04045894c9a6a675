"""ArrayRecord shards read by index: a true shuffle over every clip of the host.

The host's clips are numbered ``0 .. n-1`` (its shards in sorted order, records in file order).
Epoch ``e`` visits them in the order of a pseudo-random permutation of that range drawn from
``(seed, host, e)`` (Grain's ``index_shuffle``: a bijection evaluated per index, no table), so the
element ``i`` of the endless stream is clip ``permute_e(i mod n)`` of epoch ``e = i // n``. The
iterator's state is the next ``i``: a few integers, however many clips there are.

Worker processes slice the index stream (worker ``w`` of ``N`` takes ``w, w + N, ...``), so each
epoch is still every clip exactly once.

Class-balanced sampling (``PipelineConfig.balanced_labels``, the builder's clip-labels table):
each epoch is ``n`` draws with replacement, clip ``j`` drawn with probability proportional to
``sum over its labels c of 1 / count(c)`` (counts over the whole table: all hosts weigh alike),
so every class is drawn about equally often (AudioSet's balanced sampler). Draw ``i`` of epoch
``e`` is a pure function of ``(seed, host, e, i)``, so a resume repeats the draws exactly.

ArrayRecord shards must be written with ``group_size:1`` (the shard builder does): one record
per compressed chunk, so a random read decompresses only the clip it wants.
"""

from __future__ import annotations

import bisect
import sys
from typing import Any

import grain
import numpy as np

from mwmae.data import shards, storage
from mwmae.data.clips import crop_key
from mwmae.data.errors import Skipped, known, skipped
from mwmae.data.records import RecordError
from mwmae.data.sequential import Preparer, seed_of


class ClipIndex(grain.MapDataset):
    """Element ``i``: ``(epoch, position)`` of the ``i``-th clip to read (endless if epochs is
    None); ``position`` numbers the host's clips across its shards."""

    def __init__(self, num_clips: int, config: Any, process_index: int, epochs: int | None,
                 weights: np.ndarray | None = None):
        super().__init__()
        if num_clips <= 0:
            raise ValueError("the host's ArrayRecord shards hold no records")
        self._n, self._config, self._epochs = num_clips, config, epochs
        self._seed = seed_of(config.seed, process_index, 3)
        self._cumulative = None
        if weights is not None:
            if weights.shape != (num_clips,) or not np.all(weights >= 0) or weights.sum() <= 0:
                raise ValueError(f"sampling weights: expected {num_clips} non-negative values "
                                 "with a positive sum")
            self._cumulative = np.cumsum(weights / weights.sum())

    def __len__(self) -> int:
        return sys.maxsize if self._epochs is None else self._n * self._epochs

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), self._n)
        if self._cumulative is not None and self._config.train:
            u = crop_key(self._seed, epoch, i) / 2.0**64   # uniform in [0, 1)
            j = int(np.searchsorted(self._cumulative, u, side="right"))
            return epoch, min(j, self._n - 1)
        if self._config.train and self._n > 1:
            i = grain.experimental.index_shuffle(
                i, max_index=self._n - 1, seed=(self._seed + epoch) % (1 << 32), rounds=4)
        return epoch, int(i)

    def __str__(self) -> str:
        return f"ClipIndex({self._n} clips, epochs={self._epochs})"


class ReadClip:
    """``(epoch, position)`` -> prepared clip, or a :class:`Skipped` marker in its place
    (``on_error="skip"``): the marker keeps the index's place in the stream, so it is counted
    when the run consumes that place, not when a reader thread gets to it."""

    def __init__(self, host_shards: list[tuple[int, shards.Shard]], counts: list[int],
                 config: Any):
        self._shards, self._config = list(host_shards), config
        self._starts = np.cumsum([0, *counts]).tolist()
        self._prepare = Preparer(config)
        self._source = None  # opened lazily, in the process that reads
        self._failed_in_a_row = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}

    def _read(self, shard_index: int, record: int) -> bytes:
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(
                [shard.path for _, shard in self._shards])
        return self._source[self._starts[shard_index] + record]

    def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray] | Skipped:
        epoch, position = item
        s = bisect.bisect_right(self._starts, position) - 1
        key, shard = self._shards[s]
        record = position - self._starts[s]
        skipping = self._config.on_error == "skip"
        # A record this process skipped before (an earlier epoch, a draw with replacement) is
        # skipped again as it was, without reading or decoding it again.
        remembered = known(shard.path, record) if skipping else None
        if remembered is not None:
            self._failed(f"{shard.path}: record {record}: {remembered[0].reason}")
            return remembered[0]
        try:
            element = self._prepare(self._read(s, record), epoch, key, record)
        except Exception as e:  # the native reader raises plain RuntimeError/ValueError
            message = str(e)
            if shard.path not in message:
                message = f"{shard.path}: record {record}: {message}"
            if not skipping:
                raise RecordError(message) from e
            self._failed(message, e)
            return skipped(shard.path, record, str(e))
        self._failed_in_a_row = 0
        return element

    def _failed(self, message: str, error: Exception | None = None) -> None:
        # Only markers and no clip would spin training forever: stop once every clip failed.
        self._failed_in_a_row += 1
        if self._failed_in_a_row > self._starts[-1]:
            raise RuntimeError(f"every clip of this host's ArrayRecord shards failed to read "
                               f"(the last: {message})") from error


def clip_stream(host_shards: list[tuple[int, shards.Shard]], config: Any, *,
                process_index: int, epochs: int | None,
                read_threads: int) -> grain.IterDataset:
    """Prepared clips of one host (or, once sliced, one worker) in shuffled index order, with a
    :class:`Skipped` marker in place of each clip that could not be read."""
    counts = [s.num_records if s.num_records is not None else shards.count_records(s)
              for _, s in host_shards]
    weights = None
    if config.balanced_labels:
        weights = balanced_weights(config.balanced_labels, [s for _, s in host_shards], counts)
    index = ClipIndex(sum(counts), config, process_index, epochs, weights)
    clips = index.map(ReadClip(host_shards, counts, config))
    return clips.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                   prefetch_buffer_size=4 * read_threads))


def balanced_weights(table: str, host_shards: list[shards.Shard], counts: list[int]
                     ) -> np.ndarray:
    """Each of the host's clips' sampling weight, ``sum over its labels of 1 / count(label)``
    with counts over the whole clip-labels ``table`` (``shard,record,labels``, written by the
    shard builder); an error naming the table when it does not cover the host's shards."""
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(storage.read_text(table))))
    if not rows or set(rows[0]) != {"shard", "record", "labels"}:
        raise ValueError(f"{table}: not a clip-labels table (shard,record,labels)")
    by_shard: dict[str, dict[int, list[int]]] = {}
    frequency: dict[int, int] = {}
    for row in rows:
        ids = [int(x) for x in row["labels"].split(";") if x]
        by_shard.setdefault(row["shard"], {})[int(row["record"])] = ids
        for c in ids:
            frequency[c] = frequency.get(c, 0) + 1
    weights = []
    for shard, count in zip(host_shards, counts, strict=True):
        name = shard.path.rsplit("/", 1)[-1]
        table_rows = by_shard.get(name)
        if table_rows is None or len(table_rows) != count:
            found = "no rows" if table_rows is None else f"{len(table_rows)} rows"
            raise ValueError(f"{table}: {found} for {name} ({count} records): the table is not "
                             "these shards' (rebuild them, or turn balanced sampling off)")
        weights += [sum(1.0 / frequency[c] for c in table_rows[r]) for r in range(count)]
    w = np.asarray(weights, np.float64)
    # A clip without labels still gets drawn, as rarely as the rarest labelled clip.
    floor = w[w > 0].min() if np.any(w > 0) else 1.0
    return np.where(w > 0, w, floor)
