"""Smoke run of the FSD50K recipe on one GPU: the paper's MW-MAE base, 2,000 steps at batch 128.

It checks the whole path (shards, compile, Pallas kernel, checkpoints, resume, export, HEAR
evaluation) at the cost of a few minutes before renting a TPU or an 8-GPU host for
``fsd50k_mwmae_base.py``.

Commands (the README's "FSD50K recipe"):
  python -m tfrecord_tools.build fsd50k --root /data/FSD50K --split val --shard-size 256 \
      --workers 0 --out /data/fsd50k/val        # 4,170 clips: a quick build for the smoke run
  python -m mwmae.train --config configs/fsd50k_mwmae_base_smoke.py --workdir runs/fsd50k_smoke \
      --config.data.train_shards=/data/fsd50k/val/data-manifest.csv
  # the same in the cuda image, on one GPU of the host:
  launch/gpu_docker.sh train --image IMAGE --gpus device=0 \
      --config configs/fsd50k_mwmae_base_smoke.py --workdir /srv/runs/fsd50k_smoke \
      --data /data/fsd50k/val/data-manifest.csv
  python -m mwmae.export --workdir runs/fsd50k_smoke --out artifacts/fsd50k_smoke

``data.train_shards`` is a placeholder: pass your manifest (the dev shards work as well).

Hardware: one GPU (H100/H200 class); mesh ``dp`` over whatever devices there are, so it also runs
on a TPU VM host or on 8 GPUs (batch 128 splits over 1, 2, 4 or 8 devices).

Model: identical to ``fsd50k_mwmae_base.py`` (92,814,576 parameters, bfloat16). Schedule: lr =
1.5e-5 x 128 / 256 = 7.5e-6 peak, warmup over the first 320 steps (one epoch of the dev split at
batch 128), cosine to 0 at step 2,000.

Expected (an estimate, not yet run on FSD50K): about 75 s of steps on one H200 (2,000 x the
measured 36.2-38.7 ms per base step at batch 128) plus ~15-30 s of compile; the loss falls during
the warmup; checkpoints at steps 1000 and 2000 under WORKDIR/checkpoints; a rerun with
``--config.num_train_steps=2500`` resumes at 2000. The encoder is far from trained: HEAR scores
from it only show that evaluation works.
"""

from mwmae.data.shard_set import ShardSet
from mwmae.train.config import paper_base_config


def get_config():
    c = paper_base_config("mwmae")
    c.batch_size = 128
    c.num_train_steps = 2_000
    c.optimizer.warmup_epochs = 1.0             # 320 steps: 40,966 // 128
    c.mesh.preset = "dp"

    c.data.source = "shards"
    c.data.train_shards = ShardSet("gs://YOUR_BUCKET/fsd50k/val", "data").manifest   # override this
    c.data.num_train_examples = 40_966   # the dev split: sets the epoch length of the schedule
    c.data.cycle_length = 4        # shards read at once per worker process; with one worker
                                   # per core (num_workers=-1) 128 / 36 ms = ~3,500 clips/s
    c.data.shuffle_buffer = 1024

    c.log_every_steps = 50
    c.image_every_steps = 1_000
    c.checkpoint.every_steps = 1_000
    c.checkpoint.keep_last = 2
    return c
