"""Which implementation ``"auto"`` takes, layer by layer, when something measured it.

A model's attention calls differ in what makes a kernel worth it: the encoder's few visible
tokens under global heads, the decoder's whole sequence under many window sizes. A plan maps
each call, named by its static shape (:class:`Layer`), to one implementation; the trainer builds
it from a preflight's measurements on the device and its own numerics guard, and installs it
with :func:`use_plan` around tracing, so the model code never hears of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

PlanKey = tuple[int, tuple[int, ...], bool]

_PLAN: contextvars.ContextVar[Mapping[PlanKey, str] | None] = contextvars.ContextVar(
    "mwmae_attention_plan", default=None)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One attention call of a model as a single device runs it: ``batch`` is per device."""

    name: str
    batch: int
    heads: int
    length: int
    head_dim: int
    window_sizes: tuple[int, ...]
    shift: bool
    dtype: str

    @property
    def key(self) -> PlanKey:
        """What identifies the call at trace time (batch and dtype are the run's, fixed)."""
        return plan_key(self.length, self.window_sizes, self.shift)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.length, self.head_dim)

    def describe(self) -> str:
        windows = ",".join(map(str, self.window_sizes))
        return (f"{self.name} (B={self.batch} H={self.heads} L={self.length} D={self.head_dim} "
                f"windows {windows}{' shifted' if self.shift else ''}, {self.dtype})")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["window_sizes"] = list(self.window_sizes)
        return d

    def with_batch(self, batch: int) -> Layer:
        return dataclasses.replace(self, batch=batch)


def plan_key(length: int, window_sizes: Sequence[int], shift: bool) -> PlanKey:
    return (int(length), tuple(int(w) for w in window_sizes), bool(shift))


@contextlib.contextmanager
def use_plan(plan: Mapping[PlanKey, str] | None) -> Iterator[None]:
    """``"auto"`` takes ``plan[key]`` for the calls traced inside (None: no plan)."""
    token = _PLAN.set(dict(plan) if plan else None)
    try:
        yield
    finally:
        _PLAN.reset(token)


def planned(length: int, window_sizes: Sequence[int], shift: bool) -> str | None:
    """The plan's implementation for this call, or None (no plan, or the plan omits it)."""
    plan = _PLAN.get()
    if not plan:
        return None
    return plan.get(plan_key(length, window_sizes, shift))
