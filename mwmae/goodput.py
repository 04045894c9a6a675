"""Goodput: the share of a run's wall time spent in productive steps, over all its restarts.

Every process that trains a workdir is one *segment*. Its process 0 appends a line to the
workdir's ledger (:attr:`mwmae.workdir.Workdir.goodput_path`) at each log point and when it
stops; a line holds the segment's cumulative seconds so far by part (:data:`MEASURED`), the
step it started from (the restored checkpoint) and the last step it finished. This module is
the arithmetic over those lines, with nothing of the trainer or JAX, so ``inspect`` can read it
anywhere.

Restarts: when a later segment starts from step S below a segment's last step P, that
segment's steps S+1..P were done again. Their productive seconds (interpolated between the
segment's flushed steps) move to ``recomputed``. A segment's time after its last line (a
``kill -9``, a lost VM) is not known and not counted: the total is the sum of what was
flushed, and :attr:`Summary.unfinished` says how many segments ended that way.

The ledger is a diagnostic record, never state: :func:`read` skips a line that is not one
(torn by a kill, not UTF-8, an edited value out of range, a duplicate) and names the file and
the first such line in one warning; training goes on and appends its lines after them.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

# Seconds each segment measures; ``productive`` is the rest of its wall time.
MEASURED = ("startup", "compile", "input_wait", "checkpoint", "evaluation", "productive")
# What the whole run reports: the measured parts, plus productive time that was redone.
PARTS = (*MEASURED, "recomputed")
# The shares reported (TensorBoard's perf/ group): goodput itself, then every other part.
FRACTIONS = ("goodput", *(f"goodput_{k}" for k in PARTS if k != "productive"))
VERSION = 1


@dataclasses.dataclass(frozen=True)
class Line:
    """One flush of one segment."""

    segment: str
    started: float  # wall clock (unix seconds) when the segment began
    start_step: int  # the step it resumed from (0 for a fresh run)
    step: int  # the last step it finished
    wall: float  # seconds since it began
    seconds: Mapping[str, float]  # cumulative, by MEASURED part
    final: bool = False  # written as the segment stopped (not killed)

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, "segment": self.segment, "started": round(self.started, 3),
                "start_step": self.start_step, "step": self.step,
                "wall": round(self.wall, 3),
                **{k: round(float(self.seconds.get(k, 0.0)), 3) for k in MEASURED},
                **({"final": True} if self.final else {})}

    @classmethod
    def from_json(cls, row: Any) -> Line:
        """Raises KeyError/TypeError/ValueError (naming the field) for a row that is not a
        ledger line: a missing field, a value of the wrong type, a count or a number of
        seconds that is negative or not finite, parts that add up to more than the wall."""
        if not isinstance(row, Mapping):
            raise TypeError(f"a JSON {type(row).__name__}, not an object")
        if row.get("v", VERSION) != VERSION:
            raise ValueError(f"version {row['v']!r}, not {VERSION}")
        segment = row["segment"]
        if not isinstance(segment, str) or not segment:
            raise ValueError(f"segment is {segment!r}, not a non-empty string")
        start_step = _count(row, "start_step", 0)
        step = _count(row, "step", start_step)
        wall = _seconds(row, "wall")
        seconds = {k: _seconds(row, k) for k in MEASURED}
        # Each part is rounded to a millisecond when written; allow for that.
        if sum(seconds.values()) > wall * (1 + 1e-6) + 1e-3 * len(MEASURED):
            raise ValueError(f"its parts ({', '.join(MEASURED)}) add up to "
                             f"{sum(seconds.values()):.3f} s, more than its wall {wall:.3f} s")
        final = row.get("final", False)
        if not isinstance(final, bool):
            raise ValueError(f"final is {final!r}, not true or false")
        return cls(segment, _seconds(row, "started"), start_step, step, wall, seconds, final)


def _seconds(row: Mapping[str, Any], key: str) -> float:
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"{key} is {value!r}, not a finite number >= 0")
    return float(value)


def _count(row: Mapping[str, Any], key: str, least: int) -> int:
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{key} is {value!r}, not a whole number >= {least}")
    return value


def segment_line(segment: str, started: float, start_step: int, step: int, wall: float,
                 measured: Mapping[str, float], final: bool = False) -> Line:
    """A line from the measured parts other than ``productive``, which is the rest of
    ``wall`` (every step's time the other parts do not claim)."""
    seconds = {k: float(measured.get(k, 0.0)) for k in MEASURED if k != "productive"}
    seconds["productive"] = max(0.0, wall - sum(seconds.values()))
    return Line(segment, started, start_step, step, wall, seconds, final)


@dataclasses.dataclass(frozen=True)
class Summary:
    """The whole run so far."""

    seconds: dict[str, float]  # by PARTS; ``productive`` excludes what was recomputed
    total: float  # wall seconds of every segment up to its last line
    segments: int
    unfinished: int  # segments without a final line: killed, or still running
    between: float  # wall clock between one segment's last line and the next one's start
    last_step: int
    skipped_lines: int = 0  # torn or foreign lines left out

    @property
    def goodput(self) -> float:
        return self.seconds["productive"] / self.total if self.total > 0 else math.nan

    def fractions(self) -> dict[str, float]:
        """``goodput`` and ``goodput_<part>``: shares of the total wall time (they sum to 1)."""
        if self.total <= 0:
            return {}
        shares = [self.goodput, *(self.seconds[k] / self.total for k in PARTS
                                   if k != "productive")]
        return dict(zip(FRACTIONS, shares, strict=True))


def parse(rows: Iterable[Any]) -> tuple[list[Line], int]:
    """(ledger lines, how many rows were not ledger lines or repeated an earlier one)."""
    lines, bad, seen = [], 0, set()
    for row in rows:
        try:
            x = Line.from_json(row)
        except (KeyError, TypeError, ValueError):
            bad += 1
            continue
        if _identity(x) in seen:
            bad += 1
            continue
        seen.add(_identity(x))
        lines.append(x)
    return lines, bad


def _identity(x: Line) -> str:
    """What makes two ledger lines the same flush (a copied line adds no time)."""
    return json.dumps(x.to_json(), sort_keys=True)


def read(path: str | os.PathLike) -> tuple[list[Line], int]:
    """The ledger at ``path`` (local or gs://): (its valid lines in order, how many it
    skipped). Nothing in it stops a run or ``inspect``: every line that is not a ledger line
    or repeats an earlier one is skipped, and the file, the first such line and its problem
    are named in one warning; no file (or a folder in its place, said so) reads as empty."""
    from etils import epath

    try:
        data = epath.Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return [], 0
    except OSError as e:
        problem = "a folder, not a file" if isinstance(e, IsADirectoryError) else (
            f"unreadable ({type(e).__name__}: {e})")
        log.warning("goodput: ignoring the ledger %s: %s", path, problem)
        return [], 0
    lines: list[Line] = []
    seen: dict[str, int] = {}
    problems: list[tuple[int, str]] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            x = Line.from_json(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            problems.append((number, f"not UTF-8 text (byte {e.object[e.start]:#04x})"))
            continue
        except json.JSONDecodeError:
            problems.append((number, "not JSON (a line cut short by a kill?)"))
            continue
        except KeyError as e:
            problems.append((number, f"no {e.args[0]!r} field"))
            continue
        except (TypeError, ValueError) as e:
            problems.append((number, str(e)))
            continue
        if _identity(x) in seen:
            problems.append((number, f"a duplicate of line {seen[_identity(x)]}"))
            continue
        seen[_identity(x)] = number
        lines.append(x)
    if problems:
        number, problem = problems[0]
        log.warning("goodput: skipped %d line(s) of %s that are not ledger lines (line %d: "
                    "%s%s); the ledger only reports, so training goes on", len(problems),
                    path, number, problem,
                    f"; and {len(problems) - 1} more" if len(problems) > 1 else "")
    return lines, len(problems)


def summarise_rows(rows: Iterable[Mapping[str, Any]], unreadable: int = 0) -> Summary:
    """:func:`summarise` of the ledger's rows as read (``unreadable``: lines that were not
    JSON)."""
    lines, bad = parse(rows)
    return summarise(lines, unreadable + bad)


def _productive_at(lines: list[Line], step: float) -> float:
    """A segment's productive seconds through ``step``, linear between its flushed steps
    (from zero at its start step)."""
    points = [(float(lines[0].start_step), 0.0)] + [(float(x.step), x.seconds["productive"])
                                                    for x in lines]
    steps = [p[0] for p in points]
    i = bisect.bisect_right(steps, step) - 1
    if i < 0:
        return 0.0
    if i == len(points) - 1:
        return points[-1][1]
    (s0, p0), (s1, p1) = points[i], points[i + 1]
    return p0 if s1 == s0 else p0 + (p1 - p0) * (step - s0) / (s1 - s0)


def summarise(lines: Iterable[Line], skipped_lines: int = 0) -> Summary:
    """Every segment's last line added up; steps a later segment started below move from
    ``productive`` to ``recomputed``. Segments are in ledger (append) order."""
    by_segment: dict[str, list[Line]] = {}
    for x in lines:
        by_segment.setdefault(x.segment, []).append(x)
    segments = list(by_segment.values())
    seconds = dict.fromkeys(PARTS, 0.0)
    total = between = 0.0
    for k, own in enumerate(segments):
        last = own[-1]
        for part in MEASURED:
            seconds[part] += last.seconds[part]
        total += last.wall
        later = [s[0].start_step for s in segments[k + 1:]]
        # Steps above the lowest step any later segment resumed from were done again.
        cut = max(min(later, default=last.step), own[0].start_step)
        if cut < last.step:
            redone = last.seconds["productive"] - _productive_at(own, cut)
            seconds["productive"] -= redone
            seconds["recomputed"] += redone
        if k + 1 < len(segments):
            between += max(0.0, segments[k + 1][0].started - (last.started + last.wall))
    return Summary(seconds, total, len(segments),
                   sum(not s[-1].final for s in segments), between,
                   segments[-1][-1].step if segments else 0, skipped_lines)


def describe(summary: Summary) -> str:
    """One line for ``inspect``: goodput, the total and every part's share."""
    if summary.segments == 0 or summary.total <= 0:
        return "goodput: nothing recorded"
    parts = ", ".join(f"{k.replace('_', ' ')} {100 * summary.seconds[k] / summary.total:.1f}%"
                      for k in PARTS if k != "productive")
    text = (f"goodput: {100 * summary.goodput:.1f}% of {summary.total:.0f} s over "
            f"{summary.segments} segment{'s' if summary.segments != 1 else ''} ({parts})")
    if summary.unfinished:
        text += (f"; {summary.unfinished} without a final line (killed, or still running): "
                 "their time after their last line is not counted")
    if summary.between > 0:
        text += f"; {summary.between:.0f} s between segments, not counted"
    if summary.skipped_lines:
        text += f"; {summary.skipped_lines} unreadable line(s) skipped"
    return text
