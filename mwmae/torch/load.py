"""Loading an mwmae artifact folder into a PyTorch :class:`Encoder`, without JAX.

The folder's ``config.json`` (format ``mwmae-artifact``) gives the architecture under
``model``; ``model.safetensors`` the tensors, named as :mod:`mwmae.torch.weights` says. The
format's version number is not checked: what decides whether this reader can build the model
is the model dict (unknown keys are refused) and the tensor names (checked one by one). The
weights file is checked against the SHA-256 ``config.json`` records by the function
``mwmae.load`` uses (:func:`mwmae.checksum.verified_weights`, standard library only), so the two
refuse the same files: a mismatch, and a config that records none.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import torch

from mwmae.checksum import WEIGHTS_DIGEST_KEY, WeightsChecksumError, verified_weights
from mwmae.torch.config import ConfigError, EncoderConfig
from mwmae.torch.encoder import Encoder
from mwmae.torch.weights import DECODER_ENTRIES, WeightsError

FORMAT = "mwmae-artifact"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MSGPACK_FILE = "params.msgpack"  # the JAX-only weights file of older exports


class ArtifactError(ValueError):
    """A folder this reader cannot load; the message names the file and what to do."""


def read_config(path: str | os.PathLike) -> tuple[EncoderConfig, dict[str, Any]]:
    """(encoder config, the whole config.json) of the artifact folder ``path``."""
    folder = pathlib.Path(path)
    cfg_path = folder / CONFIG_FILE
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such file or directory")
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a folder; give the artifact's folder (the one with "
                            f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{cfg_path}: missing; not an mwmae artifact folder") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"{cfg_path}: format is {got!r}, expected {FORMAT!r}")
    if "model" not in meta:
        raise ArtifactError(f"{cfg_path}: no 'model' entry (the architecture)")
    try:
        return EncoderConfig.from_dict(meta["model"]), meta
    except ConfigError as e:
        raise ArtifactError(f"{cfg_path}: {e}") from e


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a torch floating dtype (e.g. 'float32', "
                         "'bfloat16', 'float16')")
    return resolved


def load(path: str | os.PathLike, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None) -> Encoder:
    """The encoder of the artifact folder ``path``, in eval mode, on ``device`` (default CPU)
    with parameters in ``dtype`` (default float32, whatever dtype the JAX config trained in).

    A whole-autoencoder artifact loads too: its decoder tensors are left out. A folder with only
    the older ``params.msgpack`` is refused with the command that writes ``model.safetensors``.
    The file is checked against the SHA-256 that ``config.json`` records for it; a config that
    records none is refused, as ``mwmae.load`` refuses it.
    """
    folder = pathlib.Path(path)
    config, meta = read_config(folder)
    torch_dtype = _torch_dtype(dtype)
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        if (folder / MSGPACK_FILE).exists():
            source = f" (its source: {meta['source']})" if meta.get("source") else ""
            raise ArtifactError(
                f"{folder}: holds {MSGPACK_FILE} only, the JAX weights file of an older export"
                f"{source}; mwmae.torch reads {WEIGHTS_FILE}. Re-export the model with "
                "`python -m mwmae.export` (--workdir or --from-original, --out NEW_FOLDER), "
                f"which writes {WEIGHTS_FILE} as well.")
        raise ArtifactError(f"{weights}: missing; an artifact for PyTorch needs {WEIGHTS_FILE} "
                            "beside config.json (written by `python -m mwmae.export`)")
    try:
        from safetensors.torch import load
    except ImportError as e:
        raise ImportError("reading model.safetensors needs the safetensors package "
                          "(pip install safetensors)") from e
    # The digest config.json records is that of its params_file: of another file it vouches
    # for nothing here.
    recorded = (meta.get(WEIGHTS_DIGEST_KEY) if meta.get("params_file") == WEIGHTS_FILE
                else None)
    try:
        blob = verified_weights(weights, recorded, CONFIG_FILE)
    except WeightsChecksumError as e:
        raise ArtifactError(str(e)) from e
    try:
        # The very bytes that were checked: reading the file again could see another one.
        tensors = load(blob)
    except Exception as e:  # the library raises its own error types for a damaged file
        raise ArtifactError(f"{weights}: not a readable safetensors file ({e})") from e
    encoder_tensors = {k: v for k, v in tensors.items() if k.split("/")[0] not in DECODER_ENTRIES}
    try:
        model = Encoder.from_params(config, encoder_tensors)
    except WeightsError as e:
        raise ArtifactError(f"{weights}: {e}") from e
    return model.to(device=device, dtype=torch_dtype)
