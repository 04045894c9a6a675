"""The source of batches a config's ``data`` block names, for any task."""

from __future__ import annotations

import ml_collections

from mwmae.data import PipelineConfig
from mwmae.data.sources import ShardSource, Source, SyntheticSource
from mwmae.data.workers import resolve_num_workers


def make_source(config: ml_collections.ConfigDict, balanced_labels: str | None = None
                ) -> Source:
    """The source of batches ``config.data.source`` names, sized by the config
    (``balanced_labels``: class-balanced sampling by that clip-labels table)."""
    frames, n_mels = config.model.img_size
    if config.data.source == "synthetic":
        return SyntheticSource(config.batch_size, config.seed, frames, n_mels)
    if config.data.source == "shards":
        d = config.data
        return ShardSource(d.train_shards, PipelineConfig(
            global_batch_size=config.batch_size, seed=config.seed, crop_frames=frames,
            n_mels=n_mels, shuffle_buffer=d.shuffle_buffer, cycle_length=d.cycle_length,
            num_workers=resolve_num_workers(d.num_workers), on_error=d.on_error,
            balanced_labels=balanced_labels))
    raise ValueError(f"data.source {config.data.source!r}: expected 'synthetic' or 'shards'")
