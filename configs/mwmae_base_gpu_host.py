"""MW-MAE-B/4x16 pretraining on AudioSet on one GPU host: 1 or 8 NVIDIA H100/H200 GPUs.

Command (the host's GPUs, one JAX process; the guide "Pretrain on one GPU host" has the rest):
  python -m mwmae.train --config configs/mwmae_base_gpu_host.py --workdir runs/base \
      --config.data.source=shards --config.data.train_shards=/srv/data/audioset/manifest.csv
or in the cuda image: launch/gpu_docker.sh train --image IMAGE \
      --config configs/mwmae_base_gpu_host.py --workdir DIR --data MANIFEST

The paper's model, batch, optimizer and schedule (``configs/mwmae_base_200_4x16.py``), with
the layers unrolled: the H100 compiler then plans 28.8 GiB per GPU at batch 1024 on one GPU
instead of the scanned step's 46.8 GiB, and 5.0 GiB per GPU on 8 (7.4 scanned). Compiled for
H100s without a GPU (`compile_check --gpu h100 [--num_gpus 8]`). The step has not been timed
on a GPU in this form: run the preflight (the launcher does) and size the run by its
``run_hours``. Input: every core of the host decodes (``data.num_workers=-1``).
Expected: the base config's result (the paper's MW-MAE-B-4x16 HEAR scores), in the time the
preflight's ``step`` section states.
"""

from mwmae.train.family import pretrain_config


def get_config():
    c = pretrain_config("mwmae-B-4x16")
    # One copy of every layer instead of a scanned body: 40% less memory in the H100 compiler's
    # plan (the scan keeps stacked copies for the backward), at ~30 s of compile.
    c.model.scan_unroll = max(c.model.depth, c.model.decoder_depth)
    return c
