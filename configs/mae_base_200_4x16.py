"""MAE-B/4x16 baseline pretraining on AudioSet (all heads global, a class token), as in the paper.

Command (TPU pod slice; see the README's "Run on a TPU pod"):
  python -m mwmae.train --config configs/mae_base_200_4x16.py --workdir gs://BUCKET/mae_base

Hardware: TPU v3-8/v4-8 or larger, global batch 1024, bfloat16 compute. Model: ViT-B encoder
(12 x 768, 12 heads), plain decoder 4 x 384 with 8 global heads, class token; 92,814,784
parameters.
Expected: 100 epochs of 1984 steps; the paper's MAE-B-4x16 baseline, which MW-MAE beats on most
HEAR tasks.
"""

from mwmae.train.family import pretrain_config


def get_config():
    # The family's mae-B-4x16 (configs/pretrain.py:mae-B-4x16 is the same config).
    return pretrain_config("mae-B-4x16")
