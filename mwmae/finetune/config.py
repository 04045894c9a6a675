"""The schema of a tagger (fine-tuning or probing) config: the trainer's, plus ``tagger.*``.

Files in ``configs/tag.py`` start from :func:`tag_config`. The keys shared with pretraining
(``batch_size``, ``optimizer``, ``mesh``, ``data``, ``checkpoint``, ``init_from`` ...) mean the
same; ``model`` must match the encoder that ``init_from`` names (the decoder fields are unused).
"""

from __future__ import annotations

import ml_collections

from mwmae.data import storage
from mwmae.data.shard_set import ShardSet
from mwmae.finetune.model import HEADS, POOLINGS
from mwmae.finetune.step import TASKS
from mwmae.train.config import MAY_CHANGE_ON_RESUME, ConfigError, check_config, default_config

# The metric that ranks evaluations (and picks the checkpoint kept as the best), per task.
MAIN_METRIC = {"multilabel": "mAP", "multiclass": "top1"}


def tag_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.data.source = "shards"
    # Class-balanced sampling (ArrayRecord shards): clips drawn with replacement, weighted by
    # the rarity of their labels (PREFIX-clip-labels.csv beside the train manifest).
    c.data.balanced_sampling = False
    c.image_every_steps = 0            # no reconstructions: there is no decoder
    c.optimizer.base_learning_rate = 1e-3   # scaled by batch_size / 256, as in pretraining
    c.optimizer.warmup_epochs = 1.0
    c.tagger = ml_collections.ConfigDict()
    t = c.tagger
    t.task = "multilabel"              # "multilabel" (sigmoid BCE; mAP) | "multiclass" (top-1)
    # Classes: -1 reads them from the labels CSV (index,label) that tfrecord_tools.build writes
    # beside the manifest; labels_csv "" means PREFIX-labels.csv beside data.train_shards.
    t.num_classes = -1
    t.labels_csv = ""
    t.head = "linear"                  # "linear" | "mlp" (one hidden layer of the encoder width)
    # "mean": all patch tokens averaged (the class token where the model has one); "time": each
    # frequency band's tokens averaged over time, concatenated (the HEAR scene embedding).
    t.pooling = "mean"
    t.freeze_encoder = False           # True: a probe; only the head learns
    t.dropout = 0.0                    # on the pooled features (and the MLP's hidden layer)
    t.drop_path = 0.1                  # stochastic depth over the encoder's blocks
    t.layer_decay = 0.75               # layer-wise lr decay (1.0: none)
    t.label_smoothing = 0.0            # multiclass only
    # Augmentation on the device (random 2 s crops are the input pipeline's).
    t.mixup_alpha = 0.0                # > 0: mixup with Beta(alpha, alpha) weights, labels mixed
    t.time_masks = 0                   # SpecAugment: masks per clip, and their largest width
    t.time_mask_frames = 0
    t.freq_masks = 0
    t.freq_mask_bins = 0
    # Held-out evaluation: every clip of these shards in full (2 s windows, logits averaged
    # over each clip's windows weighted by their frames); every eval_every_steps and at the end.
    t.eval_shards = ""                 # manifest CSV, glob or path; "" : no evaluation
    t.eval_every_steps = 500           # 0: only at the end
    t.eval_batch_size = 64             # windows per evaluation batch, over all hosts
    t.keep_best = True                 # keep the checkpoint of the best evaluation too
    return c


# tagger.eval_shards may name the same split elsewhere (a copy on another disk): a different
# split is refused when the run resumes, since evaluations.jsonl records each row's split by
# content and the best checkpoint is ranked over those rows.
MAY_CHANGE = (*MAY_CHANGE_ON_RESUME, "tagger.eval_shards", "tagger.eval_every_steps",
              "tagger.eval_batch_size")


def labels_csv(config: ml_collections.ConfigDict) -> str | None:
    """The labels CSV this run reads its classes from, or None when it has none."""
    if config.tagger.labels_csv:
        return config.tagger.labels_csv
    train = config.data.train_shards
    return ShardSet.from_manifest(train).labels if ShardSet.is_manifest(train) else None


def clip_labels_csv(config: ml_collections.ConfigDict) -> str:
    """The clip-labels table beside the train manifest, for class-balanced sampling."""
    train = config.data.train_shards
    if not ShardSet.is_manifest(train):
        raise ConfigError("data.balanced_sampling needs data.train_shards to be the builder's "
                          "PREFIX-manifest.csv (its PREFIX-clip-labels.csv gives the weights)")
    path = ShardSet.from_manifest(train).clip_labels
    if not storage.exists(path):
        raise ConfigError(f"{path}: missing; data.balanced_sampling weighs clips by this table, "
                          "which tfrecord_tools.build writes for labelled sources (rebuild)")
    return path


def read_vocabulary(path: str) -> list[str]:
    """Label names by index from an ``index,label`` CSV; an error naming the file otherwise."""
    try:
        text = storage.read_text(path)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no labels CSV here (tfrecord_tools.build writes "
                          "PREFIX-labels.csv for labelled sources); set tagger.labels_csv or "
                          "tagger.num_classes") from e
    rows = [line.split(",", 1) for line in text.splitlines()[1:] if line.strip()]
    try:
        indices = [int(r[0]) for r in rows]
    except ValueError as e:
        raise ConfigError(f"{path}: not an index,label CSV ({e})") from e
    if not rows or indices != list(range(len(rows))):
        raise ConfigError(f"{path}: expected rows index,label with indices 0..N-1 in order")
    return [r[1] if len(r) > 1 else "" for r in rows]


def num_classes(config: ml_collections.ConfigDict) -> int:
    """tagger.num_classes, or the rows of the labels CSV when it is -1. Both given, they must
    agree: a head of other width than the vocabulary drops classes or scores ones that do not
    exist."""
    path = labels_csv(config)
    given = config.tagger.num_classes
    if given > 0:
        # A derived CSV may be absent: that is why num_classes was given.
        if path is not None and (config.tagger.labels_csv or storage.exists(path)):
            listed = len(read_vocabulary(path))
            if listed != given:
                raise ConfigError(f"tagger.num_classes={given}: {path} lists {listed} classes; "
                                  "leave it -1 to read them from there")
        return given
    if not config.data.train_shards:
        raise ConfigError("data.train_shards is empty: give the labelled shards (the manifest "
                          "CSV that tfrecord_tools.build writes, local or gs://)")
    if path is None:
        raise ConfigError("tagger.num_classes=-1 (read the labels CSV) but data.train_shards is "
                          "not a manifest (PREFIX-manifest.csv): set tagger.labels_csv or "
                          "tagger.num_classes")
    return len(read_vocabulary(path))


def check_tag_config(config: ml_collections.ConfigDict) -> None:
    """The schema's keys and the trainer's rules, then the tagger's own (one line, naming the
    key)."""
    if "tagger" not in config:
        raise ConfigError("not a tagger config (it has no tagger.* keys; a pretraining config?): "
                          "start from configs/tag.py or mwmae.finetune.config.tag_config()")
    check_config(config, tag_config())
    t = config.tagger
    problems = []
    if t.task not in TASKS:
        problems.append(f"tagger.task={t.task!r}: must be one of {', '.join(map(repr, TASKS))}")
    if t.pooling not in POOLINGS:
        problems.append(f"tagger.pooling={t.pooling!r}: must be one of "
                        f"{', '.join(map(repr, POOLINGS))}")
    if t.head not in HEADS:
        problems.append(f"tagger.head={t.head!r}: must be one of {', '.join(map(repr, HEADS))}")
    if t.num_classes == 0 or t.num_classes < -1:
        problems.append(f"tagger.num_classes={t.num_classes}: must be >= 1, or -1 for the "
                        "labels CSV")
    for key in ("dropout", "drop_path"):
        if not 0 <= t[key] < 1:
            problems.append(f"tagger.{key}={t[key]}: must lie in [0, 1)")
    if not 0 < t.layer_decay <= 1:
        problems.append(f"tagger.layer_decay={t.layer_decay}: must lie in (0, 1]")
    if not 0 <= t.label_smoothing < 1:
        problems.append(f"tagger.label_smoothing={t.label_smoothing}: must lie in [0, 1)")
    for key in ("mixup_alpha", "time_masks", "time_mask_frames", "freq_masks",
                "freq_mask_bins", "eval_every_steps"):
        if t[key] < 0:
            problems.append(f"tagger.{key}={t[key]}: must be >= 0")
    if t.eval_batch_size < 1:
        problems.append(f"tagger.eval_batch_size={t.eval_batch_size}: must be >= 1")
    if config.image_every_steps:
        problems.append(f"image_every_steps={config.image_every_steps}: a tagger has no decoder "
                        "and writes no reconstruction images (0)")
    if config.data.source != "shards":
        problems.append(f"data.source={config.data.source!r}: a tagger trains on labelled "
                        "shards ('shards')")
    if problems:
        raise ConfigError("bad config: " + "; ".join(problems))


def check_vocabularies(config: ml_collections.ConfigDict) -> None:
    """The evaluation split must be listed whole and prove it uses the training split's labels
    (same names, same ids): class ids are bare integers in the records, so a split built with
    another vocabulary would be scored as if its ids were the run's, silently."""
    spec = config.tagger.eval_shards
    if not spec:
        return
    if not ShardSet.is_manifest(spec):
        raise ConfigError(f"tagger.eval_shards={spec!r}: give the evaluation split as the "
                          "builder's PREFIX-manifest.csv, whose PREFIX-labels.csv proves its "
                          "classes are the training split's (a glob or a shard has none)")
    from mwmae.finetune.evaluate import list_split

    list_split(spec)  # a missing manifest or shard is named before anything is written
    eval_csv = ShardSet.from_manifest(spec).labels
    train_csv = labels_csv(config)
    if train_csv is None:
        raise ConfigError("tagger.eval_shards needs the training split's labels to check the "
                          "evaluation split's against, and data.train_shards is not a "
                          "PREFIX-manifest.csv: set tagger.labels_csv to its index,label CSV")
    if not storage.exists(train_csv):
        raise ConfigError(f"{train_csv}: missing; tagger.eval_shards is checked against the "
                          "training split's labels CSV: set tagger.labels_csv to it, or rebuild "
                          "data.train_shards with its labels")
    if not storage.exists(eval_csv):
        raise ConfigError(f"{eval_csv}: missing; tagger.eval_shards ({spec}) must prove its "
                          f"classes are the training split's ({train_csv}): rebuild it with its "
                          "labels (tfrecord_tools.build with the training split's --vocabulary)")
    ours, theirs = read_vocabulary(train_csv), read_vocabulary(eval_csv)
    if ours != theirs:
        diff = next(i for i, (a, b) in enumerate(zip(ours + [None] * len(theirs),
                                                     theirs + [None] * len(ours))) if a != b)
        raise ConfigError(f"{eval_csv}: the evaluation split's labels are not the training "
                          f"split's ({train_csv}): index {diff} is "
                          f"{theirs[diff] if diff < len(theirs) else 'missing'!r} there, "
                          f"{ours[diff] if diff < len(ours) else 'missing'!r} here; build both "
                          "with one --vocabulary")
