"""The one schema of a training config; files in ``configs/`` start from :func:`default_config`.

Keys not listed here are rejected when a config is loaded (a typo must not silently train with
defaults).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

import ml_collections

from mwmae.model.config import ModelConfig


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Tuples, not lists: ml_collections can override tuples from the command line
    # (--config.model.decoder_window_sizes="(2,5,10,25,50,125,0,0)").
    c.model = ml_collections.ConfigDict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in ModelConfig().to_dict().items()})

    c.seed = 0
    # Start from pretrained weights: an exported artifact, an original-format checkpoint folder
    # or a pretraining workdir (its checkpoint init_from_step; -1: the latest). Read on the
    # run's first start only; a resume continues from the run's own checkpoint.
    c.init_from = ""
    c.init_from_step = -1
    c.batch_size = 1024            # global, over all hosts and devices
    c.num_epochs = 100
    c.num_train_steps = -1         # > 0 overrides num_epochs
    c.steps_per_epoch = -1         # > 0 overrides data.num_train_examples // batch_size

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.base_learning_rate = 1.5e-5   # scaled by batch_size / 256
    c.optimizer.warmup_epochs = 10.0
    c.optimizer.weight_decay = 0.05
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    # The original decays every parameter; True exempts biases, norms, position embeddings and
    # the mask/cls tokens (the usual ViT recipe).
    c.optimizer.decay_exempt_1d = False
    c.optimizer.grad_clip_norm = 0.0           # > 0 clips the global gradient norm
    c.grad_accum_steps = 1                     # microbatches per step

    # Mesh over all devices of all hosts: -1 = the rest. A preset ("dp", "fsdp", "fsdp_tp")
    # replaces the axis sizes. dcn_data > 1 spans the data axis across slices (multi-slice).
    c.mesh = ml_collections.ConfigDict(
        {"preset": "", "data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1})

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"    # "synthetic" | "shards"
    c.data.train_shards = ""       # manifest CSV, glob or path of shards; local or gs://
    # Shuffle window per host, in clips (TFRecord shards; ArrayRecord shuffles over all clips).
    # The original shuffled over ~512k clips; that many 200x80 float32 crops are 32 GB, beyond
    # a host's spare memory. 16,384 clips = 1 GB per host, and the shard order (reshuffled
    # every epoch) plus cycle_length shards interleaved do the rest of the mixing.
    c.data.shuffle_buffer = 16_384
    # TFRecord shards read at once per worker (each by a thread), ArrayRecord reader threads
    # per worker. With 8 or more workers that is 32+ shards in flight per host: clips of ~32
    # shards per window, as the original's interleave over many files. Read buffers cost
    # ~1 MB per open shard.
    c.data.cycle_length = 4
    # Processes that parse, normalise and crop (0: threads of the training process; the GIL
    # then caps a host near one core's worth of clips). -1: one per core less one, at most 32.
    c.data.num_workers = -1
    c.data.on_error = "raise"      # "raise" | "skip" (and count) damaged records/shards
    # Examples per epoch for the lr schedule; -1: the sum of the manifest's record counts
    # (AUDIOSET_CLIPS for synthetic data). A value > 0 overrides.
    c.data.num_train_examples = -1

    c.log_every_steps = 100
    c.progress_bar = False         # a terminal progress bar (primary host) instead of log lines
    c.image_every_steps = 1000     # TensorBoard images of inputs, masks and reconstructions
    c.num_images = 3
    c.profile_steps = 0            # > 0: capture a profile of this many steps after step 10
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000        # 0: off
    c.checkpoint.every_minutes = 0.0       # 0: off; else also save when this much time passed
    c.checkpoint.keep_last = 3
    c.checkpoint.keep_every_steps = 0      # > 0: keep every such step forever
    # Checkpoints an earlier config of the run kept (its keep_every_steps, a tagger's best) stay
    # kept although this config would not keep them; True lets this config's retention delete
    # them.
    c.checkpoint.release_kept = False
    c.checkpoint.asynchronous = True
    c.nonfinite_policy = "stop"    # a non-finite loss/grad: "stop" (after dropping the update)
                                   # or "skip" (drop the update, count it, go on)
    c.trace_batches = False        # write WORKDIR/trace/<host>.jsonl: per-step loss and clip ids
    # The workdir's writer lease goes stale this long after its holder last refreshed it (every
    # quarter of it): how long a successor waits before taking over from a holder on another
    # machine. A holder whose pid is gone on this same machine is taken over at once.
    c.lease_seconds = 120.0
    return c


def paper_base_config(kind: str = "mwmae") -> ml_collections.ConfigDict:
    """The paper's base pretraining recipe, which the base configs vary: ViT-B encoder
    (12 x 768, 12 global heads), decoder 4 x 384 with 8 heads, mask ratio 0.8, bfloat16; AdamW
    lr 1.5e-5 x batch / 256, weight decay 0.05, 10 warmup epochs of 100, batch 1024.
    ``kind="mwmae"``: decoder windows (2, 5, 10, 25, 50, 125, 0, 0), no cls token; ``"mae"``:
    the MAE baseline (global decoder heads, a cls token)."""
    if kind not in ("mwmae", "mae"):
        raise ValueError(f"kind {kind!r}: expected 'mwmae' or 'mae'")
    c = default_config()
    mwmae = kind == "mwmae"
    c.model.update(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=384,
                   decoder_depth=4, decoder_num_heads=8, window_sizes=(0,),
                   decoder_window_sizes=(2, 5, 10, 25, 50, 125, 0, 0) if mwmae else (0,),
                   use_cls_token=not mwmae, mask_ratio=0.8, dtype="bfloat16")
    c.batch_size = 1024
    c.num_epochs = 100
    c.optimizer.base_learning_rate = 1.5e-5
    c.optimizer.warmup_epochs = 10.0
    c.optimizer.weight_decay = 0.05
    return c


# The small model of the tiny and demo configs: a CPU trains it at several steps a second, and its
# decoder still mixes windowed and global heads.
TINY_MODEL = dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=2,
                  decoder_num_heads=4, window_sizes=(0,), decoder_window_sizes=(5, 25, 0, 0))


# What a resumed run may set differently from the run its workdir holds: length, cadences,
# where data and logs come from, how the same math is laid out on devices. Everything else
# (architecture, optimizer, seed, batch, the input pipeline's shape) fixes the run; a rerun that
# changes it is refused. data.num_workers is not among them: the iterator state a checkpoint
# holds is per input worker, so a checkpoint saved with N workers restores only with N.
MAY_CHANGE_ON_RESUME = (
    "num_train_steps", "num_epochs", "steps_per_epoch", "data.num_train_examples",
    "data.train_shards", "data.on_error",
    "log_every_steps", "progress_bar", "image_every_steps", "num_images", "profile_steps",
    "trace_batches", "nonfinite_policy", "lease_seconds",
    "checkpoint.*", "mesh.*", "model.attention_impl",
    "model.attention_guard", "model.scan_unroll",
)

SOURCES = ("synthetic", "shards")
NONFINITE_POLICIES = ("stop", "skip")


class ConfigError(ValueError):
    """A config value or key the trainer cannot run with; one line, naming the key."""


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config."""
    out = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out += all_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def nearest_keys(key: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The known dotted keys closest to ``key`` (for 'did you mean' messages)."""
    known = list(known)
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, known, n=n, cutoff=0.6)
    by_leaf = [k for k in known
               if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)]
    return list(dict.fromkeys(close + by_leaf))[:n]


def unknown_key_message(key: str, schema: ml_collections.ConfigDict | None = None) -> str:
    near = nearest_keys(key, all_keys(default_config() if schema is None else schema))
    hint = f"; nearest valid: {', '.join(near)}" if near else ""
    if key.split(".")[0] == "tagger" and "tagger" not in (schema or {}):
        hint += ("; a fine-tuning config (tagger.*) runs with python -m mwmae.finetune, not "
                 "mwmae.train")
    return f"unknown config key {key!r}{hint}"


AUDIOSET_CLIPS = 2_032_320   # AudioSet unbalanced + balanced, as the paper


def train_examples(config: ml_collections.ConfigDict) -> int:
    """Examples per epoch: ``data.num_train_examples`` if set, else counted from the shards."""
    if config.data.num_train_examples > 0:
        return config.data.num_train_examples
    if config.data.source != "shards":
        return AUDIOSET_CLIPS
    from mwmae.data import shards

    total = 0
    for shard in shards.resolve(config.data.train_shards):
        if shard.num_records is not None:
            total += shard.num_records
        elif shard.format == shards.ARRAY_RECORD:
            total += shards.count_records(shard)  # read from the file's index: cheap
        else:
            raise ValueError(
                f"data.num_train_examples is -1 (count the shards) but {shard.path} is a "
                "TFRecord shard without a manifest; pass the manifest CSV that "
                "tfrecord_tools.build writes, or set data.num_train_examples")
    return total


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def _check_values(c: ml_collections.ConfigDict) -> list[str]:
    problems = []

    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            value = c
            for part in key.split("."):
                value = value[part]
            problems.append(f"{key}={value!r}: {rule}")

    def one_of(key: str, allowed: tuple[str, ...]) -> None:
        value = c
        for part in key.split("."):
            value = value[part]
        need(value in allowed, key, f"must be one of {', '.join(map(repr, allowed))}")

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    need(c.seed >= 0, "seed", "must be >= 0")
    need(c.batch_size >= 1, "batch_size", "must be >= 1")
    o = c.optimizer
    # 0 is allowed: a run that only evaluates (or checks the pipeline) keeps its weights.
    need(finite(o.base_learning_rate) and o.base_learning_rate >= 0,
         "optimizer.base_learning_rate", "must be a finite number >= 0")
    need(finite(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay",
         "must be a finite number >= 0")
    need(finite(o.warmup_epochs) and o.warmup_epochs >= 0, "optimizer.warmup_epochs",
         "must be a finite number >= 0")
    need(finite(o.grad_clip_norm) and o.grad_clip_norm >= 0, "optimizer.grad_clip_norm",
         "must be >= 0 (0: off)")
    need(0 <= o.b1 < 1, "optimizer.b1", "must be in [0, 1)")
    need(0 <= o.b2 < 1, "optimizer.b2", "must be in [0, 1)")
    need(finite(o.eps) and o.eps > 0, "optimizer.eps", "must be a finite number > 0")
    need(0 < c.model.mask_ratio < 1, "model.mask_ratio",
         "must be strictly between 0 and 1 (some patches kept, some reconstructed)")
    if finite(c.model.mask_ratio) and 0 < c.model.mask_ratio < 1 and not problems:
        problems += _mask_problems(c)
    need(c.num_train_steps == -1 or c.num_train_steps >= 1, "num_train_steps",
         "must be >= 1, or -1 to train num_epochs epochs")
    need(c.num_train_steps >= 1 or c.num_epochs >= 1, "num_epochs",
         "must be >= 1 (or set num_train_steps)")
    need(c.steps_per_epoch == -1 or c.steps_per_epoch >= 1, "steps_per_epoch",
         "must be >= 1, or -1 for data.num_train_examples // batch_size")
    need(c.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    need(c.log_every_steps >= 1, "log_every_steps", "must be >= 1")
    need(c.image_every_steps >= 0, "image_every_steps", "must be >= 0 (0: off)")
    need(c.num_images >= 1, "num_images", "must be >= 1")
    need(c.profile_steps >= 0, "profile_steps", "must be >= 0 (0: off)")
    need(c.lease_seconds > 0, "lease_seconds", "must be > 0")
    need(c.checkpoint.keep_last >= 1, "checkpoint.keep_last",
         "must be >= 1 (a run must keep at least its newest checkpoint)")
    need(c.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: off)")
    need(c.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0 (0: off)")
    need(c.checkpoint.keep_every_steps >= 0, "checkpoint.keep_every_steps",
         "must be >= 0 (0: off)")
    need(c.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    need(c.data.cycle_length >= 1, "data.cycle_length", "must be >= 1")
    need(c.data.num_train_examples == -1 or c.data.num_train_examples >= 1,
         "data.num_train_examples", "must be >= 1, or -1 for the manifest's record count")
    need(c.data.num_workers >= -1, "data.num_workers",
         "must be >= 0 (0: in process), or -1 for one per core less one")
    one_of("data.source", SOURCES)
    from mwmae.data.pipeline import ON_ERROR

    one_of("data.on_error", ON_ERROR)
    one_of("nonfinite_policy", NONFINITE_POLICIES)
    return problems


def _mask_problems(c: ml_collections.ConfigDict) -> list[str]:
    """A ratio strictly inside (0, 1) can still keep no patch (0.999 of 250 keeps
    int(0.25) = 0) or, in pretraining, mask none: the count the masking code keeps decides."""
    try:
        mc = model_config_from(c)
        total, kept = mc.num_patches, mc.len_keep
    except (TypeError, ValueError, ZeroDivisionError):
        return []  # the architecture's own error is reported by check_config
    key = f"model.mask_ratio={c.model.mask_ratio!r}"
    if kept < 1:
        return [f"{key}: keeps {kept} of the {total} patches (int({total} * (1 - ratio))); "
                "the encoder needs at least 1: use a smaller ratio"]
    if "tagger" not in c and total - kept < 1:
        return [f"{key}: keeps {kept} of the {total} patches, so no patch is masked and "
                "pretraining has nothing to reconstruct: use a larger ratio"]
    return []


def check_config(config: ml_collections.ConfigDict,
                 schema: ml_collections.ConfigDict | None = None) -> None:
    """Fail before any compilation on keys the schema (:func:`default_config` unless given)
    does not know and values out of range; the error is one line naming the key."""
    schema = default_config() if schema is None else schema

    def walk(ref, got, prefix):
        for k in got.keys():
            if k not in ref:
                raise ConfigError(unknown_key_message(f"{prefix}{k}", schema))
            if isinstance(ref[k], ml_collections.ConfigDict) and k != "model":
                walk(ref[k], got[k], f"{prefix}{k}.")
    if "tagger" in config and "tagger" not in schema:  # say that first: it explains the rest
        raise ConfigError(unknown_key_message("tagger", schema))
    walk(schema, config, "")
    try:
        problems = _check_values(config)
    except TypeError as e:  # e.g. a string where a number belongs
        raise ConfigError(f"config value of the wrong type: {e}") from e
    if problems:
        raise ConfigError("bad config: " + "; ".join(problems))
    check_int_range(config)  # integers past the step counter or int64
    try:
        model_config_from(config)  # validates the architecture (window sizes, dims)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad model config: {e}") from e


# The train state counts steps in int32 (and the schedule, cadences and ETA compare with it);
# every other integer must at least survive conversion to a 64-bit array or C integer.
STEP_MAX = 2**31 - 1
INT64 = (-2**63, 2**63 - 1)


def _counts_steps(key: str) -> bool:
    """Keys compared with (or multiplied into) the int32 step counter."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf.endswith("steps") or leaf.endswith("_step") or leaf in ("num_epochs",
                                                                        "steps_per_epoch")


def _int_leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, int]]:
    out = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out += _int_leaves(v, f"{prefix}{k}.")
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append((f"{prefix}{k}", v))
    return out


def check_int_range(config: ml_collections.ConfigDict) -> None:
    """Refuse (ConfigError, one line naming the key) an integer the run cannot represent: a
    count of steps past the int32 step counter, anything else past int64. Without this, such a
    value passes every range check, the workdir is written and the run fails later with an
    OverflowError."""
    problems = []
    for key, value in _int_leaves(config):
        if _counts_steps(key) and abs(value) > STEP_MAX:
            problems.append(f"{key}={value}: must be at most {STEP_MAX} in magnitude (the step "
                            "counter is a 32-bit integer)")
        elif not INT64[0] <= value <= INT64[1]:
            problems.append(f"{key}={value}: does not fit in a 64-bit integer")
    # The length in epochs is their product; it is known here when steps_per_epoch is given.
    if (not problems and config.get("num_train_steps", 0) <= 0
            and config.get("steps_per_epoch", 0) > 0
            and config.num_epochs * config.steps_per_epoch > STEP_MAX):
        problems.append(f"num_epochs={config.num_epochs} x steps_per_epoch="
                        f"{config.steps_per_epoch}: {config.num_epochs * config.steps_per_epoch} "
                        f"steps, more than the step counter holds ({STEP_MAX})")
    if problems:
        raise ConfigError("bad config: " + "; ".join(problems))
