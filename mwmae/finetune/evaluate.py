"""Whole-clip evaluation of a tagger on a held-out split, over all hosts.

Every clip of the split counts, in full: its log-mel is normalised over all its frames (as the
training clips are), padded at the end to a whole number of ``frames``-long windows (the model's
2 s input, as the HEAR path chunks clips), and each window is classified. A clip's scores are the
mean of its windows' logits, each weighted by the clip frames it holds (a last window that is
mostly padding counts for little). Metrics are computed once over every clip of every host
(:mod:`mwmae.finetune.gather`, :mod:`mwmae.finetune.metrics`), never averaged over batches.

Each host reads its own shards (every ``process_count``-th, as training) and streams them at
every evaluation, so memory is one batch of windows, whatever the split's size. A first pass,
once per run, counts each host's windows: every host then runs the same number of batches (the
largest host's; the others pad), since each batch is one computation over all devices.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from mwmae.data import records, shards, storage
from mwmae.data.clips import format_labels, prepare_audio
from mwmae.finetune import metrics as metrics_lib
from mwmae.finetune.gather import allgather_exact, gather_rows
from mwmae.train.config import ConfigError


class SplitError(ConfigError, records.RecordError):
    """An evaluation split the run cannot score (missing, empty or damaged): a refusal whose
    one line names the file, since a split scored with holes would be a wrong number."""


def list_split(spec: str) -> list[shards.Shard]:
    """The split's shards, sorted; a :class:`SplitError` naming the manifest or shard when
    they cannot be listed. Cheap (the manifest and one listing per folder): the tagger calls
    it before its workdir holds anything."""
    if not storage.exists(spec) and not any(ch in spec for ch in "*?["):
        raise SplitError(f"tagger.eval_shards={spec}: no such manifest")
    try:
        listed = shards.resolve(spec)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SplitError(f"tagger.eval_shards={spec}: {e}") from e
    count = jax.process_count()
    if len(listed) < count:
        raise SplitError(f"tagger.eval_shards={spec}: {len(listed)} evaluation shard(s) for "
                         f"{count} hosts: every host needs at least one")
    return listed


def clip_id(shard_index: int, record_index: int) -> int:
    """A clip's id, unique over the split: its shard's place in the sorted list and its record's
    place in the shard."""
    return (shard_index << 32) | record_index


class EvalSplit:
    """This host's part of a held-out split (local batches of ``batch_size // process_count``
    windows)."""

    def __init__(self, spec: str, *, frames: int, n_mels: int, max_labels: int,
                 batch_size: int, num_classes: int, compression: str | None = "zlib"):
        self.frames, self.n_mels, self.max_labels = frames, n_mels, max_labels
        self.compression = compression
        self.num_classes = num_classes
        count = jax.process_count()
        if batch_size % count:
            raise ValueError(f"tagger.eval_batch_size {batch_size} is not divisible by the "
                             f"{count} hosts")
        self.local_batch = batch_size // count
        keyed = list(enumerate(list_split(spec)))
        self.shards = keyed[jax.process_index()::count]
        ids, labels, windows = [], [], []
        local_sum = 0
        for cid, logmel, label in self._clips():
            ids.append(cid)
            labels.append(label)
            windows.append(math.ceil(logmel.shape[0] / frames))
            local_sum = (local_sum + _clip_hash(cid, logmel, label)) % 2**64
        self.ids = np.asarray(ids, np.int64)
        self.labels = np.asarray(labels, np.int32).reshape(-1, max_labels)
        local = sum(windows)
        self.batches = _most_over_hosts(math.ceil(local / self.local_batch))
        self.total_clips = _sum_over_hosts(len(ids))
        if not self.total_clips:
            raise SplitError(f"tagger.eval_shards={spec}: the split holds no clips; there is "
                             "nothing to score")
        # The split's content (every clip's audio and labels, and its place), whatever its path
        # and however many hosts read it: evaluations of two different splits must never be
        # ranked against each other. A sum of the clips' hashes is the same over any hosts.
        signed = np.asarray(_every_host(local_sum - 2**64 if local_sum >= 2**63 else local_sum),
                            np.int64)
        self.fingerprint = f"{int(signed.astype(np.uint64).sum(dtype=np.uint64)):016x}"

    def _clips(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(id, log-mel [T, mels], padded labels) of every clip of this host, in order."""
        for index, shard in self.shards:
            n = 0
            try:
                for record in shards.iter_records(shard, compression=self.compression):
                    try:
                        decoded = self._decode(record)
                    except records.RecordError as e:
                        raise SplitError(f"{shard.path}: record {n}: {e}") from e
                    yield clip_id(index, n), *decoded
                    n += 1
            except SplitError:
                raise
            except (records.RecordError, OSError) as e:
                # A damaged or vanished shard: the reader failed on record n.
                reason = str(e).removeprefix(f"{shard.path}: ")
                raise SplitError(f"{shard.path}: record {n}: {reason}") from e

    def _decode(self, record: bytes) -> tuple[np.ndarray, np.ndarray]:
        logmel, label = records.decode_example(record)
        if logmel.ndim != 2 or logmel.shape[1] != self.n_mels or not logmel.size:
            raise records.RecordError(f"audio has shape {logmel.shape}, expected "
                                      f"[frames, {self.n_mels}]")
        if label.size and (label.min() < 0 or label.max() >= self.num_classes):
            raise records.RecordError(
                f"label ids {label.tolist()} outside [0, {self.num_classes}): the "
                "evaluation split has other classes than the run")
        return logmel, format_labels(label, max_labels=self.max_labels, num_classes=None)

    def windows(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``self.batches`` local batches of (windows (b, frames, mels, 1), the clip row each
        belongs to (-1: padding), its weight)."""
        b = self.local_batch
        x = np.zeros((b, self.frames, self.n_mels, 1), np.float32)
        owner = np.full(b, -1, np.int64)
        weight = np.zeros(b, np.float64)
        filled = made = 0
        for row, (_, logmel, _) in enumerate(self._clips()):
            t = logmel.shape[0]
            n = math.ceil(t / self.frames)
            # Normalised over the whole clip, as in training; padding is its mean (zero).
            clip = prepare_audio(logmel, crop_frames=n * self.frames, n_mels=self.n_mels,
                                 crop=None)
            for w in range(n):
                x[filled] = clip[w * self.frames:(w + 1) * self.frames]
                owner[filled] = row
                weight[filled] = min(self.frames, t - w * self.frames) / t
                filled += 1
                if filled == b:
                    yield x.copy(), owner.copy(), weight.copy()
                    made += 1
                    x[:], owner[:], weight[:], filled = 0.0, -1, 0.0, 0
        while made < self.batches:
            yield x.copy(), owner.copy(), weight.copy()
            x[:], owner[:], weight[:] = 0.0, -1, 0.0
            made += 1


def evaluate(split: EvalSplit, predict: Callable[[np.ndarray], np.ndarray], task: str
             ) -> dict[str, float]:
    """The split's metrics (identical on every host). ``predict`` takes this host's windows
    and returns their logits (b, classes); every host calls it ``split.batches`` times."""
    scores = np.zeros((split.ids.size, split.num_classes), np.float64)
    for x, owner, weight in split.windows():
        logits = np.asarray(predict(x), np.float64)
        real = owner >= 0
        np.add.at(scores, owner[real], logits[real] * weight[real, None])
    _, scores, labels = gather_rows(split.ids, scores, split.labels)
    if task == "multiclass":
        if np.any(labels[:, 0] < 0):
            raise ValueError("a clip of the evaluation split has no label; a multiclass split "
                             "needs one per clip")
        out = metrics_lib.multiclass(labels[:, 0], scores)
    else:
        hot = np.zeros(scores.shape, np.float32)
        rows, slots = np.nonzero(labels >= 0)
        hot[rows, labels[rows, slots]] = 1.0
        out = metrics_lib.multilabel(hot, scores)
    return {**out, "clips": int(scores.shape[0])}


def _clip_hash(cid: int, logmel: np.ndarray, label: np.ndarray) -> int:
    digest = hashlib.sha256(np.asarray([cid, *logmel.shape], np.int64).tobytes())
    digest.update(np.ascontiguousarray(logmel, np.float32).tobytes())
    digest.update(np.asarray(label, np.int32).tobytes())
    return int.from_bytes(digest.digest()[:8], "little")


def best_evaluation(rows: Iterable[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The evaluation whose checkpoint the run keeps as its best: the highest ``metric``, and
    of equal ones the latest step. That is the checkpoint manager's rule (Orbax's BestN sorts
    the checkpoints, in step order, by the metric with a stable sort and keeps the last), so
    the console names the checkpoint that is on disk. A NaN never counts as the best."""
    scored = [r for r in rows if not math.isnan(r[metric])]
    return max(scored, key=lambda r: (r[metric], r["step"]), default=None)


def _most_over_hosts(value: int) -> int:
    return int(np.max(_every_host(value)))


def _sum_over_hosts(value: int) -> int:
    return int(np.sum(_every_host(value)))


def _every_host(value: int) -> np.ndarray:
    if jax.process_count() == 1:
        return np.array([value])
    from jax.experimental import multihost_utils

    # Bit for bit: JAX without x64 would cut the split's 64-bit fingerprint to 32 bits.
    return allgather_exact(multihost_utils, np.array([value], np.int64))
