"""What the training loop draws batches from: synthetic clips or log-mel shards.

Both give this host's slice of each global batch with ``next_local()`` and carry their position
in a JSON-serialisable ``get_state()`` that the checkpoint keeps, so a resumed run draws exactly
the batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import jax
import numpy as np

from mwmae.data.pipeline import PipelineConfig, make_input_iterator
from mwmae.data.synthetic import synthetic_batch


class Source(Protocol):
    def next_local(self) -> tuple[np.ndarray, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...
    def skipped_records(self) -> int: ...
    def close(self) -> None: ...


def synthetic_source(global_batch: int, seed: int, frames: int, n_mels: int,
                     start_step: int = 0) -> Iterator[np.ndarray]:
    """This host's slice of each global batch of synthetic clips, from ``start_step`` on."""
    n_local = global_batch // jax.process_count()
    step = start_step
    while True:
        full = synthetic_batch(step, global_batch, seed=seed, frames=frames, n_mels=n_mels)
        lo = jax.process_index() * n_local
        yield full[lo:lo + n_local]
        step += 1


class SyntheticSource:
    """Endless synthetic clips; its position is the number of batches drawn."""

    def __init__(self, global_batch: int, seed: int, frames: int, n_mels: int):
        self._args = (global_batch, seed, frames, n_mels)
        self.global_batch, self.position = global_batch, 0
        self._it = synthetic_source(*self._args)

    def next_local(self) -> tuple[np.ndarray, np.ndarray]:
        """(this host's audio, the global indices of its clips)."""
        n_local = self.global_batch // jax.process_count()
        first = self.position * self.global_batch + jax.process_index() * n_local
        self.position += 1
        return next(self._it), np.arange(first, first + n_local)

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])
        self._it = synthetic_source(*self._args, start_step=self.position)

    def skipped_records(self) -> int:
        return 0

    def close(self) -> None:
        """Nothing to release (the shard source stops its worker processes here)."""


class ShardSource:
    """Log-mel shards through :func:`mwmae.data.make_input_iterator`; its position restores
    exactly."""

    def __init__(self, spec: str | list[str], config: PipelineConfig):
        if not spec:
            raise ValueError("data.source is 'shards' but data.train_shards is empty; give a "
                             "manifest CSV, a glob or a path of shards (local or gs://)")
        self._it = make_input_iterator(spec, config)

    def next_local(self) -> tuple[np.ndarray, np.ndarray]:
        """(this host's audio, its clips' labels: -1 padded ids)."""
        batch = next(self._it)
        return batch["audio"], batch["label"]

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def skipped_records(self) -> int:
        """Records lost on this host under ``on_error="skip"`` up to the position consumed
        (not what reading ahead has met), summed over its workers. The count lives in the
        iterator state, so after a restore it includes the records the run skipped before its
        checkpoint, each once."""
        return self._it.errors.skipped_records

    def close(self) -> None:
        self._it.close()
