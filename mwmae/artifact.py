"""The standalone model artifact: ``config.json`` + ``params.msgpack`` in one directory.

``config.json`` holds the format tag, the architecture (:class:`ModelConfig`), the front end the
model expects (sample rate, log-mel settings, normalisation), the SHA-256 of the parameter file,
whether the decoder is included, and where the weights came from; ``params.msgpack`` holds the
parameter tree as flax msgpack (float32). Writes go to temporary names renamed at the end, so a
crash never leaves a half-written artifact that looks complete.

Version 1 artifacts always hold the whole autoencoder. Version 2 adds ``encoder_only`` (written
as version 2 only when true, so readers that know version 1 refuse an encoder-only artifact
with an "upgrade" message instead of a list of missing decoder weights) and the ``front_end``
description.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import serialization

from mwmae import audio
from mwmae.model import encoder_keys
from mwmae.model.config import ModelConfig

FORMAT = "mwmae-artifact"
VERSION = 2
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"


class ArtifactError(ValueError):
    """A missing, corrupt or inconsistent artifact; the message names the file and the problem."""


def front_end() -> dict[str, Any]:
    """What a caller must feed the model: the log-mel of :mod:`mwmae.audio`, chunked to 2 s."""
    return {
        "sample_rate": audio.SAMPLE_RATE, "n_fft": audio.N_FFT, "win_length": audio.WIN_LENGTH,
        "hop_length": audio.HOP_LENGTH, "n_mels": audio.N_MELS, "f_min": audio.F_MIN,
        "f_max": audio.F_MAX, "mel_scale": "htk", "mel_norm": None, "window": "hann_periodic",
        "center": True, "pad_mode": "reflect", "power": 2.0, "log_offset": audio.LOG_OFFSET,
        "normalisation": {"hear": "per clip over (time, mel): (x - mean) / (std_ddof1 + 1e-8)",
                          "pretraining": "per clip: (x - mean) / (std_ddof0 + 1e-8)"},
        "chunk_frames": audio.CROP_FRAMES,
    }


def encoder_params(config: ModelConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~mwmae.model.Encoder`'s entries of ``params`` (what ``features`` uses)."""
    keys = encoder_keys(config)
    return {k: v for k, v in params.items() if k in keys}


def is_artifact(path: str | os.PathLike) -> bool:
    cfg = pathlib.Path(path) / CONFIG_FILE
    if not cfg.exists():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def save_artifact(directory: str | os.PathLike, config: ModelConfig, params: Any, *,
                  source: str = "", extra: dict[str, Any] | None = None,
                  encoder_only: bool = False) -> pathlib.Path:
    """Write an artifact; ``encoder_only`` drops the decoder weights (features still work)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if encoder_only:
        params = encoder_params(config, params)
    blob = serialization.msgpack_serialize(
        jax.tree.map(lambda x: np.asarray(x, np.float32), params))
    meta = {"format": FORMAT, "version": 2 if encoder_only else 1, "model": config.to_dict(),
            "encoder_only": bool(encoder_only),
            "sample_rate": audio.SAMPLE_RATE, "front_end": front_end(),
            "embedding_size": config.feature_dim,
            "params_file": PARAMS_FILE, "params_sha256": hashlib.sha256(blob).hexdigest(),
            "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            "source": source, **(extra or {})}
    for name, data in ((PARAMS_FILE, blob), (CONFIG_FILE, json.dumps(meta, indent=1).encode())):
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)
    return directory


def load_artifact(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any], dict]:
    """(config, params, metadata), after checking the format and the checksum."""
    directory = pathlib.Path(directory)
    cfg_path = directory / CONFIG_FILE
    try:
        meta = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{cfg_path}: missing; not an mwmae artifact directory") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"{cfg_path}: format is {got!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise ArtifactError(f"{cfg_path}: artifact version {meta['version']} is newer than this "
                            f"mwmae understands ({VERSION}); upgrade mwmae")
    rate = meta.get("sample_rate", audio.SAMPLE_RATE)
    if rate != audio.SAMPLE_RATE:
        raise ArtifactError(f"{cfg_path}: sample_rate {rate}; this mwmae's front end runs at "
                            f"{audio.SAMPLE_RATE} Hz only")
    params_path = directory / meta.get("params_file", PARAMS_FILE)
    try:
        blob = params_path.read_bytes()
    except FileNotFoundError as e:
        raise ArtifactError(f"{params_path}: missing") from e
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.get("params_sha256"):
        raise ArtifactError(f"{params_path}: checksum {digest[:12]}... does not match "
                            f"{str(meta.get('params_sha256'))[:12]}... in {CONFIG_FILE} "
                            "(corrupt or partially copied)")
    try:
        config = ModelConfig.from_dict(meta["model"])
        params = serialization.msgpack_restore(blob)
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{directory}: {e}") from e
    meta.setdefault("encoder_only", False)
    return config, params, meta
