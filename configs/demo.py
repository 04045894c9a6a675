"""The end-to-end demo's model: a small MW-MAE pretrained on log-mel shards on a laptop CPU.

Command (the demo runs it for you, after building the shards):
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m mwmae.train \
      --config configs/demo.py --workdir runs/demo/train \
      --config.data.train_shards=runs/demo/shards/data-manifest.csv

Hardware: 2 CPU cores, seen by JAX as 2 devices so the batch is split over a real ("data")
mesh. Encoder 64 wide, 2 layers, 4 heads; decoder 64 wide, 2 layers, 4 heads with windows
[5, 25, 0, 0]; patches, masking (80%) and loss as the paper; batch 32; 2000 steps.
Expected: ~4 steps/s after a ~10 s compile (~8.5 min); the loss falls from ~1.9 to ~0.45 on
the demo corpus (spoken words, tones, noise); checkpoints every 500 steps under WORKDIR/checkpoints,
the last three kept; TensorBoard scalars and reconstruction images under WORKDIR/tensorboard.
A rerun resumes from the newest checkpoint.
"""

from mwmae.data.shard_set import ShardSet
from mwmae.train.config import TINY_MODEL, default_config

CORPUS_CLIPS = 1200  # scripts/demo.sh's default corpus size: one epoch = CORPUS_CLIPS / batch


def get_config():
    c = default_config()
    c.model.update(**TINY_MODEL)
    c.batch_size = 32
    c.num_train_steps = 2000
    c.steps_per_epoch = CORPUS_CLIPS // c.batch_size
    # Peak lr 1e-3 (the base lr is scaled by batch / 256), one epoch of warmup, cosine to 0.
    c.optimizer.base_learning_rate = 1e-3 * 256 / c.batch_size
    c.optimizer.warmup_epochs = 1
    c.data.source = "shards"
    c.data.train_shards = ShardSet("runs/demo/shards", "data").manifest
    c.data.shuffle_buffer = 512
    # Parse in process: the model needs only ~130 clips/s and both cores for its step; a worker
    # would cost a process start (~3 s) and take CPU from the step.
    c.data.num_workers = 0
    c.mesh.preset = "dp"
    c.log_every_steps = 100
    c.progress_bar = True
    c.image_every_steps = 500
    c.checkpoint.every_steps = 500
    return c
