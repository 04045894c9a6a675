"""Shared by the trainer tests: load a repo config, run a few steps on given devices."""

import importlib.util
import pathlib

import jax

from mwmae.train.loop import Trainer, synthetic_source

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def run_steps(config, devices: list[jax.Device], steps: int = 5) -> list[float]:
    """Losses of the first ``steps`` steps on synthetic data (no checkpoints, no logs)."""
    t = Trainer(config, "/tmp/unused", devices=devices)
    state = t.initial_state()
    source = synthetic_source(config, 0)
    losses = []
    for _ in range(steps):
        state, m = t.step(state, t.global_batch(next(source)))
        losses.append(float(m["loss"]))
    return losses
