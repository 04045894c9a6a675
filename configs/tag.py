"""Fine-tuning and probing a pretrained encoder on labelled shards: one recipe, four variants.

Command (VARIANT one of audioset20k, audioset2m, esc50, demo; the README's "Fine-tuning and
probing" builds the shards of each):
  python -m mwmae.finetune --config configs/tag.py:VARIANT --workdir DIR \
      --config.init_from=ARTIFACT_OR_ORIGINAL_CHECKPOINT_OR_WORKDIR \
      --config.data.train_shards=.../train-manifest.csv \
      --config.tagger.eval_shards=.../eval-manifest.csv
  # a probe (frozen encoder, only the head learns):  --config.tagger.freeze_encoder=True
  # an MLP head:                                     --config.tagger.head=mlp

The model block must be the encoder's that init_from names (a mismatch is refused naming the
fields): the base variants take the paper's MW-MAE-B/4x16 (``paper_base_config``); the demo
variant the demo's tiny model. The classes come from the labels CSV beside the train manifest.

* ``audioset20k`` (default): AudioSet balanced train (~20k clips, 527 classes, multilabel),
  evaluated on the AudioSet eval split every 500 steps; batch 256, 60 epochs of 2 s random
  crops; lr 1e-3 x 256 / 256 with 4 warmup epochs, layer decay 0.75, weight decay 0.05,
  drop path 0.1, mixup 0.5, SpecAugment 2 time masks of <= 40 frames and 2 frequency masks of
  <= 16 bins. Hardware: one TPU v4-8 host or one GPU (ViT-B forward+backward on 250 tokens).
  Expected: mAP in the 0.3 range reported for MAE-style ViT-B encoders on AS-20k; not yet run
  here.
* ``audioset2m``: the full AudioSet train set (~2M clips): batch 512, 30 epochs, lr 2e-4 x 2
  (batch 512 / 256), 3 warmup epochs, mixup 0.5, the same masks; evaluated every 4,000 steps.
  Hardware: a TPU v4-32 slice or 8 GPUs. Not yet run here.
* ``esc50``: one ESC-50 fold held out (50 classes, multiclass, 5 s clips): train on the other
  four folds' 1,600 clips, evaluate on the held-out fold's 400 every 100 steps; batch 64,
  100 epochs, lr 5e-4, label smoothing 0.1, mixup 0.2, smaller masks. The standard protocol is
  the mean top-1 over the five folds (five runs). Not yet run here.
* ``demo``: the demo's spoken-digits task (``scripts/demo.sh`` stage ``finetune``): the tiny
  encoder of ``configs/demo.py``, time pooling (the HEAR scene embedding's 320 features), batch
  32, 300 steps (the demo runs 150), one evaluation on the test split at the end; on 2 CPU
  devices ~1 min per 150 steps. Expected: see the README's demo table.

These hyperparameters follow the MAE / AudioMAE fine-tuning recipes (scaled to 200-frame
inputs); they have not been tuned for MW-MAE here.
"""

from mwmae.data.shard_set import ShardSet
from mwmae.finetune.config import tag_config
from mwmae.train.config import TINY_MODEL, paper_base_config

VARIANTS = ("audioset20k", "audioset2m", "esc50", "demo")
AUDIOSET_BALANCED_CLIPS = 20_550   # balanced_train_segments.csv; those still online are fewer
AUDIOSET_FULL_CLIPS = 2_032_320    # unbalanced + balanced, as pretraining counts them
ESC50_TRAIN_CLIPS = 1_600          # four folds of 400


def get_config(variant: str = "audioset20k"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/tag.py:{variant}: expected one of {', '.join(VARIANTS)}")
    c = tag_config()
    t = c.tagger
    if variant == "demo":
        c.model.update(**TINY_MODEL)
    else:
        c.model.update(paper_base_config("mwmae").model)
    c.optimizer.weight_decay = 0.05
    c.optimizer.decay_exempt_1d = True
    t.layer_decay, t.drop_path = 0.75, 0.1
    t.time_masks, t.time_mask_frames, t.freq_masks, t.freq_mask_bins = 2, 40, 2, 16
    c.checkpoint.keep_last = 1

    if variant == "audioset20k":
        c.batch_size, c.num_epochs = 256, 60
        c.data.num_train_examples = AUDIOSET_BALANCED_CLIPS
        c.optimizer.base_learning_rate, c.optimizer.warmup_epochs = 1e-3, 4.0
        t.task, t.mixup_alpha = "multilabel", 0.5
        t.eval_every_steps, t.eval_batch_size = 500, 256
        c.checkpoint.every_steps = 500
    elif variant == "audioset2m":
        c.batch_size, c.num_epochs = 512, 30
        c.data.num_train_examples = AUDIOSET_FULL_CLIPS
        c.optimizer.base_learning_rate, c.optimizer.warmup_epochs = 2e-4, 3.0
        t.task, t.mixup_alpha = "multilabel", 0.5
        t.eval_every_steps, t.eval_batch_size = 4000, 512
        c.checkpoint.every_steps, c.checkpoint.every_minutes = 2000, 15.0
    elif variant == "esc50":
        c.batch_size, c.num_epochs = 64, 100
        c.data.num_train_examples = ESC50_TRAIN_CLIPS
        c.optimizer.base_learning_rate, c.optimizer.warmup_epochs = 5e-4, 5.0
        t.task, t.label_smoothing, t.mixup_alpha = "multiclass", 0.1, 0.2
        t.time_mask_frames, t.freq_mask_bins = 24, 8
        t.eval_every_steps, t.eval_batch_size = 100, 64
        c.checkpoint.every_steps = 500
    else:  # demo
        c.batch_size, c.num_train_steps, c.steps_per_epoch = 32, 300, 11
        c.optimizer.base_learning_rate, c.optimizer.warmup_epochs = 1e-3 * 256 / 32, 3.0
        t.task, t.mixup_alpha, t.pooling = "multiclass", 0.0, "time"
        t.time_masks, t.time_mask_frames, t.freq_masks, t.freq_mask_bins = 1, 20, 1, 8
        t.drop_path = 0.0
        t.eval_every_steps, t.eval_batch_size = 0, 32
        # Where scripts/demo.sh puts them (it passes its own WORKDIR's paths).
        c.init_from = "runs/demo/export"
        c.data.train_shards = ShardSet("runs/demo/digits", "train").manifest
        t.eval_shards = ShardSet("runs/demo/digits", "test").manifest
        c.data.shuffle_buffer, c.data.num_workers = 512, 0
        c.mesh.preset = "dp"
        c.log_every_steps = 100
        c.checkpoint.every_steps = 0
        c.checkpoint.keep_last = 1
    return c
