"""Verdicts and the lines a check prints: the preflight's only output conventions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}
SECTIONS = ("devices", "attention", "step", "input", "storage")


def worst(verdicts: Iterable[str]) -> str:
    return max(verdicts, key=_RANK.__getitem__, default=OK)


@dataclasses.dataclass
class Section:
    """One check's findings: lines (verdict, text) and the figures that go to the JSON."""

    name: str
    lines: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    figures: dict = dataclasses.field(default_factory=dict)

    def line(self, verdict: str, text: str) -> None:
        self.lines.append((verdict, text))

    @property
    def verdict(self) -> str:
        return worst(v for v, _ in self.lines)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "lines": [f"{v}: {t}" for v, t in self.lines],
                **self.figures}


class Printer:
    """Prints each line as it is found, so a slow check shows progress: every line on process
    0, and on the other processes only what is not ok there (prefixed with the host)."""

    def __init__(self, print_fn: Callable[[str], None] = print):
        self.print_fn, self.host = print_fn, jax.process_index()

    def show(self, section: Section, start: int = 0) -> None:
        for verdict, text in section.lines[start:]:
            if self.host == 0:
                self.print_fn(f"{section.name:<9} {verdict:<4} {text}")
            elif verdict != OK:
                self.print_fn(f"host {self.host}: {section.name:<9} {verdict:<4} {text}")


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"
