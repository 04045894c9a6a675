"""The standalone model artifact: ``config.json`` + ``model.safetensors`` in one directory.

``config.json`` holds the format tag, the architecture (:class:`ModelConfig`), the front end the
model expects (sample rate, log-mel settings, normalisation), the name and SHA-256 of the weights
file, whether the decoder is included, and where the weights came from. ``model.safetensors``
holds every parameter as a float32 tensor named by its path in the parameter tree, the keys
joined by ``/`` (``encoder/layers/block_0/attn/qkv/kernel``, scanned layers with their leading layer
axis), the layout model hubs and any safetensors reader take, and what :mod:`mwmae.torch` loads.
Writes go to temporary names renamed at the end, so a crash never leaves a half-written artifact
that looks complete.

Version 1 artifacts always hold the whole autoencoder. Version 2 adds ``encoder_only`` (written
as version 2 only when true, so readers that know version 1 refuse an encoder-only artifact
with an "upgrade" message instead of a list of missing decoder weights) and the ``front_end``
description. Both keep their weights in ``params.msgpack`` (flax msgpack), which this module
still reads. Version 3 keeps them in ``model.safetensors`` (older readers refuse it with the
"upgrade" message).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import serialization

from mwmae import audio
from mwmae.checksum import WEIGHTS_DIGEST_KEY, WeightsChecksumError, verified_weights
from mwmae.model import encoder_keys
from mwmae.model.config import ModelConfig

FORMAT = "mwmae-artifact"
VERSION = 3
CONFIG_FILE = "config.json"
PARAMS_FILE = "model.safetensors"
MSGPACK_PARAMS_FILE = "params.msgpack"  # versions 1 and 2
PARAMS_FILES = (PARAMS_FILE, MSGPACK_PARAMS_FILE)
# How tensor names spell a parameter's path (safetensors names are flat strings).
NAME_SEPARATOR = "/"


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


def has_weights_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an artifact's weights file (of any version)."""
    return any((pathlib.Path(path) / name).exists() for name in PARAMS_FILES)


# What a folder may hold and still be an artifact (possibly a damaged one) that --overwrite may
# replace: its files and their temporary names (see save_artifact).
ARTIFACT_NAMES = frozenset({CONFIG_FILE, *PARAMS_FILES, f".{CONFIG_FILE}.tmp",
                            *(f".{name}.tmp" for name in PARAMS_FILES)})


def flat_tensors(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The parameter tree as safetensors stores it: ``a/b/c`` -> contiguous float32 array."""
    from flax.traverse_util import flatten_dict

    out = {}
    for key, value in flatten_dict(dict(params)).items():
        name = NAME_SEPARATOR.join(map(str, key))
        out[name] = np.ascontiguousarray(np.asarray(value, np.float32))
    return out


def tree_from_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of :func:`flat_tensors`."""
    from flax.traverse_util import unflatten_dict

    return unflatten_dict({tuple(name.split(NAME_SEPARATOR)): np.asarray(value)
                           for name, value in tensors.items()})


def _safetensors_bytes(params: Mapping[str, Any], config: ModelConfig) -> bytes:
    from safetensors.numpy import save

    # The header's metadata says what the names mean to a reader that has only this file. One
    # key: safetensors writes a map of several in no fixed order, and the same weights must give
    # the same bytes (the artifact's checksum, reruns that find "this very artifact").
    return save(flat_tensors(params), metadata={FORMAT: json.dumps(
        {"names": "parameter paths, keys joined by '/'", "model": config.to_dict()},
        sort_keys=True)})


def existing_output(path: str | os.PathLike) -> tuple[str, str]:
    """What an artifact's output path holds now: ``("free", "")`` (nothing, or an empty folder),
    ``("artifact", description)`` (an artifact, or the remains of one: only its files, with a
    config.json that is unreadable or an artifact's) or ``("other", description)``."""
    path = pathlib.Path(path)
    if not path.exists() and not path.is_symlink():
        return "free", ""
    if not path.is_dir():
        return "other", "exists and is a file, not an artifact folder"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "free", ""
    if is_artifact(path):
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
            what = f"from {meta.get('source') or 'an unknown source'}"
            if meta.get("params_sha256"):
                what += f", sha256 {str(meta['params_sha256'])[:16]}..."
        except (OSError, ValueError):
            what = "unreadable"
        return "artifact", f"already holds an artifact ({what})"
    if set(names) <= ARTIFACT_NAMES:
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            return "artifact", "already holds a damaged artifact"
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return "other", f"exists and holds other files ({shown}), not an artifact"


def _same_artifact(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        return all((a / n).read_bytes() == (b / n).read_bytes() for n in (CONFIG_FILE, PARAMS_FILE))
    except OSError:
        return False


@contextlib.contextmanager
def replacing(directory: str | os.PathLike, *, overwrite: bool = False, name: str | None = None,
              log: Callable[[str], Any] = print) -> Iterator[pathlib.Path]:
    """A fresh folder beside ``directory`` to write an artifact into; at a clean exit it takes
    ``directory``'s place, after an error it is removed and ``directory`` is as it was.

    Only an artifact is ever replaced, and only with ``overwrite``: anything else that is not
    an empty folder is refused (ArtifactError) before the caller writes, another artifact once
    the new one is complete (the files identical to what is there count as done: reruns of a
    pipeline need no ``overwrite``). The old artifact stays whole until the new one is; the swap
    is two renames, and if the second fails the first is undone. ``name`` is how messages call
    ``directory`` (e.g. the flag that gave it).
    """
    directory = pathlib.Path(os.path.abspath(directory))
    name = name or str(directory)

    def check() -> str:
        kind, what = existing_output(directory)
        if kind == "other":
            raise ArtifactError(f"{name}: {what}; choose a new or empty folder (--overwrite "
                                "replaces only an artifact). Nothing was written.")
        return kind

    check()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = directory.parent / f".{directory.name}.partial-{tag}"
    staging.mkdir()
    try:
        yield staging
        # Checked again: another writer may have filled the path in the meantime.
        kind = check()
        if kind == "free":
            if directory.is_dir():
                directory.rmdir()
            os.rename(staging, directory)
            return
        if _same_artifact(staging, directory):
            log(f"{name}: already holds this very artifact (identical files); left as it is")
            return
        if not overwrite:
            _, what = existing_output(directory)
            raise ArtifactError(f"{name}: {what.replace('an artifact', 'another artifact')}; "
                                "pass --overwrite to replace it. Nothing was written.")
        old = directory.parent / f".{directory.name}.old-{tag}"
        os.rename(directory, old)
        try:
            os.rename(staging, directory)
        except BaseException:
            os.rename(old, directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_artifact(directory: str | os.PathLike, config: ModelConfig, params: Any, *,
                  source: str = "", extra: dict[str, Any] | None = None,
                  encoder_only: bool = False, weights_format: str = "safetensors"
                  ) -> pathlib.Path:
    """Write an artifact; ``encoder_only`` drops the decoder weights (features still work).
    ``weights_format="msgpack"`` writes the version 1/2 layout (``params.msgpack``) for readers
    that predate version 3."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if encoder_only:
        params = encoder_params(config, params)
    if weights_format == "safetensors":
        params_file, version = PARAMS_FILE, VERSION
        blob = _safetensors_bytes(params, config)
    elif weights_format == "msgpack":
        params_file, version = MSGPACK_PARAMS_FILE, 2 if encoder_only else 1
        blob = serialization.msgpack_serialize(
            jax.tree.map(lambda x: np.asarray(x, np.float32), params))
    else:
        raise ValueError(f"weights_format {weights_format!r}: expected 'safetensors' or "
                         "'msgpack'")
    meta = {"format": FORMAT, "version": version, "model": config.to_dict(),
            "encoder_only": bool(encoder_only),
            "sample_rate": audio.SAMPLE_RATE, "front_end": front_end(),
            "embedding_size": config.feature_dim,
            "params_file": params_file, "params_sha256": hashlib.sha256(blob).hexdigest(),
            "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            "source": source, **(extra or {})}
    for name, data in ((params_file, blob), (CONFIG_FILE, json.dumps(meta, indent=1).encode())):
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
    params_file = meta.get("params_file", MSGPACK_PARAMS_FILE)
    if params_file not in PARAMS_FILES:
        raise ArtifactError(f"{cfg_path}: params_file {params_file!r}: expected one of "
                            f"{', '.join(PARAMS_FILES)}")
    params_path = directory / params_file
    try:
        blob = verified_weights(params_path, meta.get(WEIGHTS_DIGEST_KEY), CONFIG_FILE)
    except FileNotFoundError as e:
        raise ArtifactError(f"{params_path}: missing") from e
    except WeightsChecksumError as e:
        raise ArtifactError(str(e)) from e
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{directory}: {e}") from e
    try:
        if params_file == PARAMS_FILE:
            from safetensors.numpy import load

            params = tree_from_tensors(load(blob))
        else:
            params = serialization.msgpack_restore(blob)
    except Exception as e:  # noqa: BLE001 - the checksum matched: a writer's bug or a new format
        raise ArtifactError(f"{params_path}: unreadable ({type(e).__name__}: {e})") from e
    meta.setdefault("encoder_only", False)
    meta["params_file"] = params_file
    return config, params, meta
