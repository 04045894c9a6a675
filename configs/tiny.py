"""A tiny MW-MAE that pretrains on one CPU in about a minute: the demo and test config.

Command:
  python -m mwmae.train --config configs/tiny.py --workdir /tmp/mwmae_tiny

Hardware: any CPU (2 cores are enough). Encoder 64 wide, 2 layers, 4 heads; decoder 64 wide,
2 layers, 4 heads with windows [5, 25, 0, 0]; batch 8; 40 steps on synthetic audio-like log-mel.
Expected: the loss falls from ~1.85 to ~1.0 over the 40 steps (~0.1 s/step after a ~5 s compile
on 2 cores) and checkpoints are written under WORKDIR/checkpoints/{20,40}; a rerun resumes at 40.
"""

from mwmae.train.config import TINY_MODEL, default_config


def get_config():
    c = default_config()
    c.model.update(**TINY_MODEL)
    c.batch_size = 8
    c.num_train_steps = 40
    c.steps_per_epoch = 20
    # Peak lr 1e-3 (base lr is scaled by batch / 256), warmup over the first 5 steps.
    c.optimizer.base_learning_rate = 1e-3 * 256 / 8
    c.optimizer.warmup_epochs = 0.25
    c.log_every_steps = 1
    c.checkpoint.every_steps = 20
    return c
