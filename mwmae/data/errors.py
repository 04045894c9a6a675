"""Records skipped under ``on_error="skip"``: logged where they happen, counted in the state.

Clips may be parsed in worker processes, each with its own copy of the pipeline, so a count kept
in a Python object of the training process would never see them. Instead the last stage of
every worker's pipeline (:class:`CountErrorsIterDataset`) writes its process's count, and the
last few records it skipped, into its iterator state. Grain hands each worker's state to the
training process with every element, so the training process sums them (:func:`summarize`),
and a checkpoint of the input position carries the counts across a restart.
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
_RECENT = 8  # skipped records named per worker in the state (the log has all of them)


class ErrorLog:
    """Records one process skipped; shared by that process's reader threads.

    ``count`` is the records lost: one per damaged record; for a shard whose stream breaks off
    (or that vanished mid-run) the rest of it when the manifest gives its length, else one; for
    a shard that reads cleanly but shorter than the manifest lists, the difference. ``events``
    is how many skips were logged (one per damaged record or shard).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self.events = 0
        self.recent: list[tuple[str, int, str]] = []

    def add(self, path: str, record: int, reason: str, records: int = 1) -> None:
        log.warning("skipping %s record %d: %s", path, record, reason)
        with self._lock:
            self.count += records
            self.events += 1
            self.recent = [*self.recent, (path, record, reason)][-_RECENT:]

    def get_state(self) -> dict[str, Any]:
        with self._lock:
            return {"count": self.count, "events": self.events,
                    "recent": [list(e) for e in self.recent]}

    def set_state(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.count = int(state["count"])
            self.events = int(state.get("events", state["count"]))
            self.recent = [(str(p), int(r), str(m)) for p, r, m in state["recent"]]

    def __getstate__(self) -> dict[str, Any]:  # each worker process starts its own, empty log
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


@dataclasses.dataclass(frozen=True)
class ErrorReport:
    """Skipped records of one host, summed over its worker processes."""

    count: int   # records lost (see ErrorLog); the figure metrics and checkpoints carry
    events: int  # skips logged: one per damaged record or shard
    entries: list[tuple[str, int, str]]  # (file, record, reason), the last few per worker

    @property
    def skipped_records(self) -> int:
        return self.count

    def __len__(self) -> int:
        return self.events


class _CountErrorsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, errors: ErrorLog):
        super().__init__(parent)
        self._errors = errors

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"inner": self._parent.get_state(), STATE_KEY: self._errors.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["inner"])
        self._errors.set_state(state[STATE_KEY])


class CountErrorsIterDataset(grain.IterDataset):
    """Passes elements through; its state adds this process's :class:`ErrorLog`."""

    def __init__(self, parent: grain.IterDataset, errors: ErrorLog):
        super().__init__(parent)
        self._errors = errors

    def __iter__(self) -> _CountErrorsIterator:
        return _CountErrorsIterator(self._parent.__iter__(), self._errors)

    def enable_shared_memory_output(self) -> None:
        """Called in a worker process: a batching parent then stacks its batch straight into
        the shared memory that carries it to the training process (one copy fewer)."""
        enable = getattr(self._parent, "enable_shared_memory_output", None)
        if enable is not None:
            enable()

    def __str__(self) -> str:
        return "CountErrorsIterDataset"


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
    """The sum over every worker's counter found in a pipeline state."""
    found = list(_walk(state))
    return ErrorReport(sum(int(s["count"]) for s in found),
                       sum(int(s.get("events", s["count"])) for s in found),
                       [(p, int(r), m) for s in found for p, r, m in s["recent"]])
