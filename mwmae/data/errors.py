"""Records skipped under ``on_error="skip"``: each keeps its place in the stream and is counted
when the run consumes that place.

A reader that cannot use a record (a damaged record; the rest of a shard whose stream broke off
or vanished; the records a shard lacks against its manifest) yields a :class:`Skipped` marker
where the clip would have been. Markers travel like clips through every stage that reads ahead
(interleave buffers, the shuffle window, ArrayRecord reader threads, worker processes), and those
stages already restore their position exactly. The stage just under the batcher
(:class:`CountSkippedIterDataset`) drops the markers and counts them in its own state. It reads
nothing ahead, so its count is the skips before the last clip it handed on; the prefetching above
it (threads, worker processes) carry that state with each batch, and :func:`summarize` adds up
the counts found in a pipeline state. So the metric and a checkpoint count what the consumed
position has passed over, and a restore, which re-reads from that position, counts no skip twice.

(Counting where records are read instead counts whatever was read ahead: up to a shuffle window
and the prefetch buffers beyond the position, all of it counted again after a restore.)
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from typing import Any

import grain

log = logging.getLogger(__name__)

STATE_KEY = "skipped_records"
_RECENT = 8  # skipped records named per counter in the state (the log has all of them)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """In the stream in place of a record that could not be used.

    ``records`` is the records lost: 1 for a damaged record; for a shard whose stream breaks
    off (or that vanished mid-run) the rest of it when the manifest gives its length, else 1;
    for a shard that reads cleanly but shorter than the manifest lists, the difference.
    """

    path: str
    record: int
    reason: str
    records: int = 1


def skipped(path: str, record: int, reason: str, records: int = 1, *,
            ends_shard: bool = False) -> Skipped:
    """The marker a reader yields for a record it skips, counted only when consumed.

    Remembered in this process (:func:`known`), so a later epoch or a restore that reaches the
    same record yields the same marker without reading or decoding it again; a shard is named
    in a warning the first time this process skips something of it, not every epoch (the
    ``skipped_records`` metric counts every skip). ``ends_shard``: nothing after this place is
    readable (the stream broke off or the file vanished)."""
    marker = Skipped(path, record, reason, records)
    with _LOCK:
        _KNOWN[(path, record)] = (marker, ends_shard)
        first = path not in _WARNED
        _WARNED.add(path)
    if first:
        log.warning("skipping %s record %d: %s (each damaged record of this shard is skipped "
                    "and counted in skipped_records; this shard is not named again)",
                    path, record, reason)
    else:
        log.debug("skipping %s record %d: %s", path, record, reason)
    return marker


def warn_once(path: str, message: str) -> None:
    """A warning about the shard ``path``, unless this process has named it already (then the
    reader, skipping it, does not name it again)."""
    with _LOCK:
        first = path not in _WARNED
        _WARNED.add(path)
    if first:
        log.warning("%s", message)


def known(path: str, record: int) -> tuple[Skipped, bool] | None:
    """``(marker, ends_shard)`` for a record this process has already skipped, else None."""
    with _LOCK:
        return _KNOWN.get((path, record))


def known_records(path: str) -> frozenset[int]:
    """The records of ``path`` this process has already skipped one by one (not where its
    stream broke off): a reader can pass over their bytes without checking or decoding them."""
    with _LOCK:
        return frozenset(r for (p, r), (_, ends) in _KNOWN.items() if p == path and not ends)


def forget() -> None:
    """Forget every skipped record and warned shard of this process (a shard repaired in
    place, tests)."""
    with _LOCK:
        _KNOWN.clear()
        _WARNED.clear()


# Per process: reader threads share them; each worker process has its own (and warns once).
_LOCK = threading.Lock()
_KNOWN: dict[tuple[str, int], tuple[Skipped, bool]] = {}
_WARNED: set[str] = set()


class SkipCount:
    """Skips consumed so far: records lost, skip events and the last few events."""

    def __init__(self):
        self.count = 0
        self.events = 0
        self.recent: list[tuple[str, int, str]] = []

    def add(self, marker: Skipped) -> None:
        self.count += marker.records
        self.events += 1
        self.recent = [*self.recent, (marker.path, marker.record, marker.reason)][-_RECENT:]

    def get_state(self) -> dict[str, Any]:
        return {"count": self.count, "events": self.events,
                "recent": [list(e) for e in self.recent]}

    def set_state(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.events = int(state.get("events", state["count"]))
        self.recent = [(str(p), int(r), str(m)) for p, r, m in state["recent"]]


@dataclasses.dataclass(frozen=True)
class ErrorReport:
    """Skipped records of one host up to its consumed position, summed over its counters (one
    per worker process when the workers batch)."""

    count: int   # records lost (see Skipped); the figure metrics and checkpoints carry
    events: int  # skips logged: one per damaged record or shard
    entries: list[tuple[str, int, str]]  # (file, record, reason), the last few per counter

    @property
    def skipped_records(self) -> int:
        return self.count

    def __len__(self) -> int:
        return self.events


class _CountSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._skips = SkipCount()

    def __next__(self):
        while True:
            element = next(self._parent)
            if not isinstance(element, Skipped):
                return element
            self._skips.add(element)

    def get_state(self) -> dict[str, Any]:
        return {"inner": self._parent.get_state(), STATE_KEY: self._skips.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["inner"])
        self._skips.set_state(state[STATE_KEY])


class CountSkippedIterDataset(grain.IterDataset):
    """Passes clips on and counts the :class:`Skipped` markers between them in its state.

    It must read nothing ahead of what it hands on: put it under the batcher, above every stage
    that prefetches.
    """

    def __iter__(self) -> _CountSkippedIterator:
        return _CountSkippedIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "CountSkippedIterDataset"


def _walk(state: Any) -> Iterator[dict[str, Any]]:
    if isinstance(state, dict):
        if STATE_KEY in state:
            yield state[STATE_KEY]
        for value in state.values():
            yield from _walk(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _walk(value)


def summarize(state: Any) -> ErrorReport:
    """The sum over every counter found in a pipeline state."""
    found = list(_walk(state))
    return ErrorReport(sum(int(s["count"]) for s in found),
                       sum(int(s.get("events", s["count"])) for s in found),
                       [(p, int(r), m) for s in found for p, r, m in s["recent"]])
