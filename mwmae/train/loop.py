"""The training loop: build state, run jitted steps, log, checkpoint with Orbax."""

from __future__ import annotations

import logging
import pathlib
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mwmae.train.config import check_config, model_config_from
from mwmae.train.optim import make_optimizer
from mwmae.train.step import TrainState, init_state, make_train_step
from mwmae.train.synthetic import synthetic_batch

log = logging.getLogger("mwmae.train")


def schedule_lengths(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(steps per epoch, total steps) from the config."""
    steps_per_epoch = (config.steps_per_epoch if config.steps_per_epoch > 0
                       else config.data.num_train_examples // config.batch_size)
    if steps_per_epoch <= 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the "
                         f"{config.data.num_train_examples} training examples")
    total = (config.num_train_steps if config.num_train_steps > 0
             else steps_per_epoch * config.num_epochs)
    return steps_per_epoch, total


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          print_fn=print) -> dict[str, float]:
    """Pretrain; returns the last step's metrics. Continues from the latest checkpoint."""
    check_config(config)
    model_config = model_config_from(config)
    steps_per_epoch, total_steps = schedule_lengths(config)
    tx, schedule = make_optimizer(config, steps_per_epoch, total_steps)

    workdir = pathlib.Path(workdir).resolve()
    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))
    state = init_state(model_config, tx, jax.random.key(config.seed))
    if manager.latest_step() is not None:
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
        print_fn(f"resumed from step {int(state.step)} in {workdir / 'checkpoints'}")

    train_step = jax.jit(make_train_step(model_config, tx, schedule, mask_seed=config.seed + 1),
                         donate_argnums=0)
    if config.data.source != "synthetic":
        raise ValueError(f"data.source {config.data.source!r} is not available yet; "
                         "use 'synthetic'")

    metrics = {}
    start = int(state.step)
    t0 = time.perf_counter()
    for step in range(start, total_steps):
        audio = synthetic_batch(step, config.batch_size, seed=config.seed,
                                frames=model_config.img_size[0], n_mels=model_config.img_size[1])
        state, metrics = train_step(state, audio)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {step + 1}")
        if (step + 1) % config.log_every_steps == 0 or step + 1 == total_steps or step == start:
            print_fn(f"step {step + 1:5d}/{total_steps}  loss {metrics['loss']:.4f}  "
                     f"lr {metrics['learning_rate']:.2e}  grad_norm {metrics['grad_norm']:.3f}  "
                     f"({time.perf_counter() - t0:.1f}s)")
        if (step + 1) % config.checkpoint_every_steps == 0 or step + 1 == total_steps:
            manager.save(step + 1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    if manager.latest_step() is not None:
        print_fn(f"checkpoint: {workdir / 'checkpoints' / str(manager.latest_step())}")
    manager.close()
    return metrics


__all__ = ["TrainState", "schedule_lengths", "train"]
