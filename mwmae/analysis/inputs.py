"""The clips the analysis runs on: the first records of the shards, as evaluation sees them.

Records are read in the shards' sorted order (the input pipeline's listing: a manifest CSV, a
glob or a path) and prepared as the evaluation pipeline prepares them: normalised over the whole
clip, then the centre crop of the model's input length, no augmentation. A clip shorter than the
input is refused rather than padded: padding would put attention on silence the clip never had.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mwmae.analysis.errors import AnalysisError
from mwmae.data import clips, records, shards


def read_clips(source: str | Sequence[str], count: int, *, frames: int, n_mels: int
               ) -> tuple[np.ndarray, list[str]]:
    """Up to ``count`` clips ``(n, frames, n_mels, 1)`` float32 and where each came from
    (``shard#record``); fewer only when the shards hold fewer."""
    try:
        listed = shards.resolve(source)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise AnalysisError(f"--shards {source}: {e}") from e
    out: list[np.ndarray] = []
    names: list[str] = []
    for shard in listed:
        try:
            for index, raw in enumerate(shards.iter_records(shard)):
                out.append(_prepare(raw, shard.path, index, frames, n_mels))
                names.append(f"{shard.path}#{index}")
                if len(out) == count:
                    return np.stack(out), names
        except (records.RecordError, FileNotFoundError, OSError) as e:
            # The readers' messages name the file already; keep them whole.
            raise AnalysisError(str(e) if shard.path in str(e) else f"{shard.path}: {e}") from e
    if not out:
        raise AnalysisError(f"--shards {source}: the shards hold no records")
    return np.stack(out), names


def _prepare(raw: bytes, path: str, index: int, frames: int, n_mels: int) -> np.ndarray:
    try:
        logmel, _ = records.decode_example(raw)
    except records.RecordError as e:
        raise AnalysisError(f"{path}: record {index}: {e}") from e
    if logmel.ndim != 2 or logmel.shape[1] != n_mels:
        raise AnalysisError(f"{path}: record {index} has log-mel of shape {logmel.shape}; the "
                            f"model takes {n_mels} mel bins")
    if logmel.shape[0] < frames:
        raise AnalysisError(
            f"{path}: record {index} has {logmel.shape[0]} frames, shorter than the model's "
            f"input of {frames} frames; the analysis needs whole inputs (use shards of clips "
            f"of at least {frames} frames)")
    try:
        return clips.prepare_audio(logmel, crop_frames=frames, n_mels=n_mels, crop=None)
    except records.RecordError as e:
        raise AnalysisError(f"{path}: record {index}: {e}") from e
