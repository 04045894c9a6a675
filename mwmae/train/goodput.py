"""Where this process's training time goes, recorded in the workdir's goodput ledger.

The loop already measures the input wait of each step and the compile; :class:`Recorder` adds
the start-up (from the start of ``train()`` to the first step, compile aside) and times the
hooks that hold the loop for other work than training: the checkpoint hook and a task's own
hooks (the tagger's evaluation, pretraining's reconstruction images). What is left of the wall
time is ``productive``. Process 0 appends the segment's figures to the ledger at each log
point and when the run stops, and writes the whole run's shares (earlier segments included,
see :mod:`mwmae.goodput`) to TensorBoard under ``perf/goodput*``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from mwmae import goodput as ledger
from mwmae.lease import Lease
from mwmae.train import metrics as metrics_lib
from mwmae.workdir import Workdir


class Recorder:
    """One segment's clock. ``began`` is ``time.perf_counter()`` when ``train()`` started."""

    def __init__(self, workdir: Workdir, writer: Any, start_step: int, began: float,
                 compile_seconds: float, *, is_main: bool = True, lease: Lease | None = None):
        self.workdir, self.writer, self.is_main, self.lease = workdir, writer, is_main, lease
        self.began, self.start_step, self.step = began, start_step, start_step
        self.started = time.time() - (time.perf_counter() - began)
        self.segment = uuid.uuid4().hex[:12]
        self.measured = {k: 0.0 for k in ledger.MEASURED if k != "productive"}
        self.measured["compile"] = compile_seconds
        self._in_loop = False
        self._closed = False
        # Earlier segments, read once: nothing else writes the ledger while this one holds
        # the workdir's lease.
        # A damaged ledger never stops the run: its bad lines are skipped, named in a warning.
        self._earlier, self._skipped = (ledger.read(workdir.goodput_path) if is_main
                                        else ([], 0))

    def loop_begins(self) -> None:
        """Start-up ends here: everything since ``began`` but the compile."""
        self._in_loop = True
        self.measured["startup"] = max(0.0, time.perf_counter() - self.began
                                       - self.measured["compile"])

    def timed(self, part: str, hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``hook``, with the time it holds the loop counted as ``part`` (also when it ends
        the run by raising); what it returns is passed on."""
        if part not in self.measured:
            raise KeyError(f"{part!r} is not a measured part: {sorted(self.measured)}")

        def run(info: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return hook(info)
            finally:
                self.measured[part] += time.perf_counter() - t0
        return run

    def count(self, info: Any) -> None:
        """Every step: the step reached and the loop's wait for its batch."""
        self.step = info.step
        self.measured["input_wait"] += info.input_wait_s

    def line(self, *, final: bool = False) -> ledger.Line:
        if not self._in_loop:  # stopped before the loop: all of it was start-up
            self.loop_begins()
        return ledger.segment_line(self.segment, self.started, self.start_step, self.step,
                                   time.perf_counter() - self.began, self.measured, final)

    def summary(self, line: ledger.Line | None = None) -> ledger.Summary:
        """The whole run up to now (or up to ``line``)."""
        return ledger.summarise([*self._earlier, line or self.line()], self._skipped)

    def flush(self, *, final: bool = False) -> None:
        """Append this segment's figures to the ledger and the run's shares to TensorBoard
        (process 0)."""
        if not self.is_main or (self.lease is not None and self.lease.lost):
            return  # a trainer that lost the lease no longer writes the workdir
        line = self.line(final=final)
        self.workdir.append_goodput(line.to_json())
        fractions = self.summary(line).fractions()
        if fractions:
            self.writer.write_scalars(line.step, metrics_lib.tagged(fractions))

    def at_log_point(self, info: Any) -> None:
        """The hook: a flush at each log point but the run's last (:meth:`close` writes that
        one, after the last save)."""
        if not info.done:
            self.flush()

    def close(self) -> None:
        """The final line, however the run ends (done, preempted, interrupted, an error)."""
        if not self._closed:
            self._closed = True
            self.flush(final=True)
