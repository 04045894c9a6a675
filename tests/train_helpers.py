"""Shared by the trainer tests: load a repo config, run a few steps on given devices."""

import importlib.util
import pathlib

import jax
import numpy as np

from mwmae.data.sources import SyntheticSource, synthetic_source
from mwmae.train.engine import Engine
from mwmae.train.pretraining import Pretraining

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, *args: str):
    """configs/NAME.py's get_config(*args) (a variant, as ``--config configs/NAME.py:ARG``)."""
    return config_module(name).get_config(*args)


def config_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_steps(config, devices: list[jax.Device], steps: int = 5) -> list[float]:
    """Losses of the first ``steps`` steps on synthetic data (no checkpoints, no logs)."""
    t = Engine(Pretraining(config), "/tmp/unused", devices=devices)
    state = t.initial_state()
    source = synthetic_source(config.batch_size, config.seed, *config.model.img_size)
    step = t.compile(state)  # the executable the loop runs
    losses = []
    for _ in range(steps):
        state, m = step(state, t.global_batch(next(source)))
        losses.append(float(m["loss"]))
    return losses


def nan_at(step_with_nan: int):
    """A ``SyntheticSource.next_local`` whose batch at ``step_with_nan`` holds a NaN (for
    monkeypatch), to drive the divergence guard."""
    original = SyntheticSource.next_local

    def next_local(self):
        audio, ids = original(self)
        if self.position == step_with_nan:
            audio = audio.copy()
            audio[0, 0, 0, 0] = np.nan
        return audio, ids
    return next_local


def checkpointing_config(steps: int = 6, every: int = 2):
    """tiny with synchronous checkpoints every ``every`` steps and no images."""
    c = load_config("tiny")
    c.num_train_steps = steps
    c.checkpoint.every_steps = every
    c.image_every_steps = 0
    c.checkpoint.asynchronous = False
    return c


def set_key(config, key: str, value) -> None:
    """Set the dotted ``key`` (``"checkpoint.every_steps"``) of a ConfigDict to ``value``."""
    *parents, leaf = key.split(".")
    for part in parents:
        config = config[part]
    config[leaf] = value
