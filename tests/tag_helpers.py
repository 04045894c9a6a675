"""Small labelled log-mel splits for the tagger's tests: written as the shard builder writes
them (TFRecord shards, PREFIX-manifest.csv, PREFIX-labels.csv), without audio to decode."""

import pathlib

import numpy as np

from mwmae.data import records, storage
from mwmae.finetune.config import tag_config
from mwmae.train.config import TINY_MODEL

FRAMES = 40  # 40 x 80 inputs: 50 tokens, quick to compile
CLASSES = ("low", "mid", "high")


def clip(rng, label: int, frames: int) -> np.ndarray:
    """A log-mel clip whose class shows as a bright band of mel bins (plus noise)."""
    x = rng.normal(size=(frames, 80)).astype(np.float32)
    x[:, 10 + 25 * label: 20 + 25 * label] += 3.0
    return x


def write_split(out: pathlib.Path, prefix: str, n: int, *, seed: int, shard_size: int = 8,
                multilabel: bool = False) -> str:
    """``n`` clips of 30-130 frames in shards of ``shard_size``; returns the manifest path."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(0, n, shard_size):
        name = f"{prefix}-{s // shard_size:05d}.tfrecord"
        with open(out / name, "wb") as f:
            w = records.TFRecordWriter(f)
            count = 0
            for i in range(s, min(n, s + shard_size)):
                label = i % len(CLASSES)
                labels = [label]
                x = clip(rng, label, int(rng.integers(30, 130)))
                if multilabel and i % 2:
                    other = (label + 1) % len(CLASSES)
                    x += clip(rng, other, x.shape[0]) - rng.normal(size=x.shape)
                    labels.append(other)
                w.write(records.encode_example(x, labels))
                count += 1
            w.close()
        rows.append(f"{name},{count}")
    storage.write_text(str(out / f"{prefix}-manifest.csv"),
                       "shard,num_records\n" + "\n".join(rows) + "\n")
    storage.write_text(str(out / f"{prefix}-labels.csv"),
                       "index,label\n" + "".join(f"{i},{c}\n" for i, c in enumerate(CLASSES)))
    return str(out / f"{prefix}-manifest.csv")


def tiny_tag_config(train: str, eval_: str, *, task: str = "multiclass", steps: int = 12):
    c = tag_config()
    c.model.update(**TINY_MODEL, img_size=(FRAMES, 80))
    c.batch_size = 8
    c.num_train_steps = steps
    c.steps_per_epoch = 4
    c.data.train_shards = train
    c.data.num_workers = 0
    c.data.shuffle_buffer = 16
    c.tagger.task = task
    c.tagger.eval_shards = eval_
    c.tagger.eval_every_steps = 4
    c.tagger.eval_batch_size = 8
    c.tagger.mixup_alpha = 0.2
    c.tagger.time_masks, c.tagger.time_mask_frames = 1, 8
    c.log_every_steps = 4
    c.checkpoint.every_steps = 4
    c.checkpoint.keep_last = 1
    c.checkpoint.asynchronous = False
    c.mesh.preset = "dp"
    c.lease_seconds = 30.0
    return c
