"""MW-MAE-B/4x16 pretraining on AudioSet, as in the paper (ICLR 2024).

Command (TPU pod slice; see the README's "Run on a TPU pod"):
  python -m mwmae.train --config configs/mwmae_base_200_4x16.py --workdir gs://BUCKET/mwmae_base

Hardware: the paper used 8 accelerators, global batch 1024, bfloat16 compute. Compiled for TPU
slices on a CPU host (README, "TPU compile checks"): as is it fits v5p-8 (32.9 GiB of 95 per
device) and v6e-8 (16.9 of 32); on v4-8 and v5e-8 (16 GiB per device) add
``--config.grad_accum_steps=2`` (two microbatches of 512, same update; 10.2 GiB on v4-8). On TPU
v3 the attention runs as XLA (the Pallas kernel needs v4 or later).
Model: ViT-B encoder (12 x 768, 12 heads, global attention), decoder 4 x 384, 8 heads with
windows [2, 5, 10, 25, 50, 125, 0, 0]; 92,814,576 parameters; mask ratio 0.8; 200 frames x 80
mel bins in 4x16 patches (250 tokens).
Expected: 100 epochs of 1984 steps; the reconstruction loss (unnormalised targets) drops fast in
the 10 warmup epochs and flattens; the resulting encoder scores in line with the paper's HEAR
results (the figures of the paper's Table 1 for MW-MAE-B-4x16).
"""

from mwmae.train.family import pretrain_config


def get_config():
    # The family's mwmae-B-4x16 (configs/pretrain.py:mwmae-B-4x16 is the same config).
    return pretrain_config("mwmae-B-4x16")
