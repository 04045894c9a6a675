"""MW-MAE-B/4x16 pretraining on FSD50K (the dev split), with the paper's model and schedule.

Commands (the README's "FSD50K recipe" has every step, from download to HEAR scores):
  python -m tfrecord_tools.build fsd50k --root /data/FSD50K --split dev --shard-size 256 \
      --workers 0 --out gs://BUCKET/fsd50k/dev
  python -m tfrecord_tools.inspect gs://BUCKET/fsd50k/dev/data-manifest.csv
  # TPU VM (one host: v4-8, v5p-8 or v5litepod-8), on spot capacity, restarted after preemptions:
  launch/tpu_vm.sh babysit --project PROJECT --zone ZONE --accelerator-type v4-8 --spot \
      --config configs/fsd50k_mwmae_base.py --workdir gs://BUCKET/runs/fsd50k_base \
      --data gs://BUCKET/fsd50k/dev/data-manifest.csv
  # one 8-GPU host (the cuda image, built after this file was committed):
  launch/gpu_docker.sh train --image IMAGE --config configs/fsd50k_mwmae_base.py \
      --workdir /srv/runs/fsd50k_base --data /srv/fsd50k/dev/data-manifest.csv
  # or the trainer itself:
  python -m mwmae.train --config configs/fsd50k_mwmae_base.py --workdir WORKDIR \
      --config.data.train_shards=gs://BUCKET/fsd50k/dev/data-manifest.csv

``data.train_shards`` is a placeholder (gs://YOUR_BUCKET/...): pass your own manifest (``--data``
in the launchers). Pretrain on ``dev`` only (train + val, 40,966 clips, 80.4 h): HEAR's FSD50K task
tests on the FSD50K ``eval`` split, which must stay unseen.

Hardware: one TPU VM host (v4-8 / v5p-8: 4 chips; v5litepod-8: 8 chips) or one host with 8 GPUs;
pure data parallelism (``mesh.preset="dp"``: the 93M-parameter model and its Adam moments, ~1.1 GB,
fit on every device), global batch 1024 (256 per v4 chip, 128 per v5e chip or GPU), bfloat16
compute. Check the memory first: ``python -m mwmae.train.compile_check --config
configs/fsd50k_mwmae_base.py --topology v4:2x2x1`` (needs libtpu); if it does not fit, add
``--config.grad_accum_steps=2`` (same batch, same lr) or ``--config.mesh.preset=fsdp``. On a pod
slice (several hosts) it runs unchanged; shard with ``--shard-size 256`` so every host gets
``num_workers`` shards or more.

Model: the paper's MW-MAE-B-4x16, identical to ``mwmae_base_200_4x16.py``: ViT-B encoder (12 x 768,
12 global heads), decoder 4 x 384 with 8 heads of windows (2, 5, 10, 25, 50, 125, 0, 0); 92,814,576
parameters; mask ratio 0.8.

Schedule: AdamW (b1 0.9, b2 0.999, weight decay 0.05), lr = 1.5e-5 x batch / 256 (6e-5 at batch
1024), linear warmup from 0 over the first 10% of the steps, then cosine to 0.

Step count: 198,400 optimizer steps at batch 1024 (= 4,960 epochs of 40 steps; 203M examples),
exactly the paper's AudioSet run (100 epochs x 1,984 steps). FSD50K has 1/50 of AudioSet's clips
(40,966 vs ~2.03M), so matching epochs (100 x 40 = 4,000 steps, 4M examples) would give the
encoder 2% of the paper's updates, far from converged MAE pretraining. Matching the number of
steps (and hence of examples seen and of compute) keeps the optimisation identical to the paper's
(same batch, lr, warmup length and cosine), so the pretraining data is the only thing that
differs. Every epoch draws a fresh random 2 s crop of each clip (clips average 7 s) and a fresh
random 80% mask, so repeated epochs do not repeat the same inputs; a clip is still seen ~5,000
times, so watch for overfitting (the loss on held-out audio). A 4x cheaper run keeps the 10%
warmup: ``--config.num_epochs=1240 --config.optimizer.warmup_epochs=124``.

Expected (an estimate, not yet run end to end): 11-13 hours on one H200 or a v4-8 at the measured
16.6% MFU (README, "FSD50K recipe", has the table); the loss falls steeply during the warmup and
then flattens, as in the AudioSet run; HEAR scores below the paper's AudioSet-pretrained model on
most tasks, since FSD50K holds ~1/70 of AudioSet's audio.
"""

from mwmae.data.shard_set import ShardSet
from mwmae.train.config import paper_base_config

FSD50K_DEV_CLIPS = 40_966   # FSD50K.ground_truth/dev.csv: train 36,796 + val 4,170


def get_config():
    c = paper_base_config("mwmae")
    # 40 steps per epoch at batch 1024; 4,960 epochs = 198,400 steps, the paper's step count.
    c.num_epochs = 4_960
    c.optimizer.warmup_epochs = 496.0           # 19,840 steps: 10% of the run, as the paper
    c.mesh.preset = "dp"

    c.data.source = "shards"
    c.data.train_shards = ShardSet("gs://YOUR_BUCKET/fsd50k/dev", "data").manifest   # override this
    c.data.num_train_examples = FSD50K_DEV_CLIPS
    c.data.cycle_length = 4        # shards read at once per worker process
    c.data.num_workers = -1        # one per core less one: thread-parsing caps near one core
    c.data.shuffle_buffer = 4096   # clips per host; 4096 x 64 KB = 256 MB

    c.log_every_steps = 200
    c.image_every_steps = 4_960    # every 124 epochs
    c.checkpoint.every_steps = 2_480          # 62 epochs; ~9 minutes on a v4-8 or one H200
    c.checkpoint.every_minutes = 15.0         # and at least this often (spot capacity)
    c.checkpoint.keep_last = 3
    c.checkpoint.keep_every_steps = 19_840    # every 10% of the run, kept for evaluation
    return c
