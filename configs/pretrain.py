"""The paper's model family, one recipe: MW-MAE and MAE, encoders tiny to huge, any patch and
decoder, pretrained as the paper did (``mwmae.train.family`` has the variant grammar).

Command:
  python -m mwmae.train --config configs/pretrain.py:VARIANT --workdir gs://BUCKET/VARIANT
  python -m mwmae.model_info --config configs/pretrain.py:VARIANT     # its parameter counts
  VARIANT e.g. mwmae-B-4x16 (default; the paper's MW-MAE-B-4x16, identical to
  configs/mwmae_base_200_4x16.py), mae-B-4x16 (= configs/mae_base_200_4x16.py), mwmae-H-4x16,
  mwmae-B-4x16-d2x384 (a 2-layer decoder), mwmae-B-8x16-w5.25.125.0.5.25.125.0 (8x16
  patches, 125 tokens).

Hardware: as configs/mwmae_base_200_4x16.py for the base models (8 accelerators, global batch
1024, bfloat16); the large and huge encoders (303M and 630M parameters in the encoder) need
``mesh.preset=fsdp`` or ``grad_accum_steps`` on 16 GiB devices: check with
``python -m mwmae.train.compile_check --config configs/pretrain.py:VARIANT --topology v5p:2x2x1``.
Expected: the base variants as their per-file configs; the others are not yet run here (the
paper reports that MW-MAE's advantage over MAE grows with the encoder size).
"""

from mwmae.train.family import pretrain_config


def get_config(variant: str = "mwmae-B-4x16"):
    return pretrain_config(variant)
