"""Ctrl-C during a HEAR evaluation: one line, exit 130, and no half-trained seed scored.

Lightning catches the KeyboardInterrupt that Ctrl-C raises inside a predictor's training, stops
that training and returns as if it had finished; hear-eval-kit then either fails ("No score
None for this model") or goes on to score the cut-short model. So the evaluation also notes the
signal (:func:`noting_interrupts`) and its predictor steps check the note
(:func:`interruptible`, :func:`claims_nothing_if_interrupted`).
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

# Set by Ctrl-C while noting_interrupts is active.
INTERRUPTED = threading.Event()


@contextlib.contextmanager
def noting_interrupts() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual and sets :data:`INTERRUPTED` too, so that code
    after a library that swallowed the KeyboardInterrupt still sees it. Signal handlers belong
    to the main thread: in another one nothing changes."""
    INTERRUPTED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum: int, frame: Any) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interruptible(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, raising KeyboardInterrupt when Ctrl-C came while it ran, even if it returned or
    failed otherwise (one grid point's training: the rest of the grid is not run)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
        except Exception:
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt from None
            raise
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt
        return result

    return wrapper


@contextlib.contextmanager
def claims_nothing_if_interrupted(result_file: pathlib.Path) -> Iterator[None]:
    """KeyboardInterrupt, and ``result_file`` removed, when Ctrl-C came during the block: what
    a step cut short wrote is not its result."""
    try:
        yield
    except BaseException:
        if INTERRUPTED.is_set():
            result_file.unlink(missing_ok=True)
            raise KeyboardInterrupt from None
        raise
    if INTERRUPTED.is_set():
        result_file.unlink(missing_ok=True)
        raise KeyboardInterrupt
