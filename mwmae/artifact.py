"""The standalone model artifact: ``config.json`` + ``params.msgpack`` in one directory.

``config.json`` holds the format tag, the architecture (:class:`ModelConfig`), the SHA-256 of the
parameter file and where the weights came from; ``params.msgpack`` holds the parameter tree as
flax msgpack (float32). Writes go to temporary names renamed at the end, so a crash never leaves
a half-written artifact that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from flax import serialization

from mwmae.model.config import ModelConfig

FORMAT = "mwmae-artifact"
VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"


class ArtifactError(ValueError):
    """A missing, corrupt or inconsistent artifact; the message names the file and the problem."""


def is_artifact(path: str | os.PathLike) -> bool:
    cfg = pathlib.Path(path) / CONFIG_FILE
    if not cfg.exists():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def save_artifact(directory: str | os.PathLike, config: ModelConfig, params: Any, *,
                  source: str = "", extra: dict[str, Any] | None = None) -> pathlib.Path:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = serialization.msgpack_serialize(
        jax.tree.map(lambda x: np.asarray(x, np.float32), params))
    meta = {"format": FORMAT, "version": VERSION, "model": config.to_dict(),
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
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{cfg_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise ArtifactError(f"{cfg_path}: artifact version {meta['version']} is newer than this "
                            f"mwmae understands ({VERSION}); upgrade mwmae")
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
    return config, params, meta
