"""The weights a run starts from (``config.init_from``): an exported artifact, an
original-format checkpoint directory (the released weights) or a pretraining workdir.

The weights replace the freshly initialised ones entry by entry (encoder, and the decoder too when
the source has one and the run wants it); the optimizer starts fresh. Only a run's first start
reads them: a resumed run continues from its own checkpoint. What was taken (the source, the
checkpoint step it resolved to, a digest of the weights) is recorded in every checkpoint of the
run, so that export's ``--initial`` writes the weights the run really started from, and refuses
when the source has changed since.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any

import numpy as np

from mwmae.model import ModelConfig, encoder_keys, param_problems

# What fixes the encoder's computation beyond its parameter shapes (shifted windows, for one,
# change no shape).
ENCODER_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                  "mlp_ratio", "window_sizes", "shifting_windows", "use_cls_token")
# The mask ratio and the loss's patch normalisation may change: continued pretraining often does.
DECODER_FIELDS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                  "decoder_window_sizes")


class InitFromError(ValueError):
    """The weights named by ``init_from`` cannot start this run; says which source and why."""


def read_source(path: str, step: int | None = None
                ) -> tuple[ModelConfig, dict[str, Any], int | None]:
    """(the source's model config, its parameters as numpy, the checkpoint step read: None for
    an artifact or original checkpoint) for any of the three sources."""
    from mwmae import api
    from mwmae.workdir import Workdir, WorkdirError

    local = pathlib.Path(path)
    if not str(path).startswith("gs://") and not local.exists():
        raise InitFromError(f"init_from={path}: no such file or directory")
    if Workdir.looks_like_one(path):
        try:
            config, params, info = Workdir(path).read_params(step, with_decoder=None)
        except WorkdirError as e:
            raise InitFromError(f"init_from={path}: {e}") from e
        return config, params, int(info["step"])
    if step is not None:
        raise InitFromError(f"init_from={path}: init_from_step={step} applies to a training "
                            "workdir only; this is an artifact or original checkpoint")
    try:
        model = api.load(path)
    except Exception as e:  # noqa: BLE001 - every loader error says what it found
        raise InitFromError(f"init_from={path}: {e}") from e
    import jax

    return model.config, jax.tree.map(np.asarray, dict(model.params)), None


def digest(params: Any) -> str:
    """SHA-256 over every array of a parameter tree (float32, sorted by name): what identifies
    the weights a run took."""
    from flax.traverse_util import flatten_dict

    h = hashlib.sha256()
    for key, value in sorted(flatten_dict(dict(params)).items()):
        h.update("/".join(map(str, key)).encode())
        h.update(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Taken:
    """The weights a run takes from ``init_from`` and what identifies them."""

    params: dict[str, Any]
    source: str
    step: int | None  # the source checkpoint's step (a workdir), else None
    with_decoder: bool  # the run asked for the decoder too

    def record(self) -> dict[str, Any]:
        """What every checkpoint of the run records about its start."""
        return {"init_from": self.source, "init_from_step": self.step,
                "with_decoder": self.with_decoder, "params_sha256": digest(self.params)}


def take(path: str, step: int | None, config: ModelConfig, *, with_decoder: bool) -> Taken:
    """The top-level parameter entries of ``path`` that this run takes over: the encoder's, and
    with ``with_decoder`` the decoder's when the source has them (an encoder-only source leaves
    the run's fresh decoder). Raises :class:`InitFromError` naming every mismatch."""
    source_config, params, read_step = read_source(path, step)
    differ = [f"{f}: {getattr(source_config, f)!r} there, {getattr(config, f)!r} here"
              for f in ENCODER_FIELDS if getattr(source_config, f) != getattr(config, f)]
    if differ:
        raise InitFromError(f"init_from={path}: its encoder is not this run's (" +
                            "; ".join(differ) + ")")
    encoder = {k: params[k] for k in encoder_keys(config) if k in params}
    problems = param_problems(config, encoder, encoder_only=True)
    if problems:
        raise InitFromError(f"init_from={path}: its encoder weights do not fit this run: "
                            + "; ".join(problems[:6]))
    taken = dict(encoder)
    decoder = {k: v for k, v in params.items() if k not in encoder}
    if with_decoder and decoder:
        differ = [f"{f}: {getattr(source_config, f)!r} there, {getattr(config, f)!r} here"
                  for f in DECODER_FIELDS if getattr(source_config, f) != getattr(config, f)]
        problems = param_problems(config, params)
        if differ or problems:
            raise InitFromError(f"init_from={path}: its decoder is not this run's (" +
                                "; ".join(differ + problems[:6]) + ")")
        taken.update(decoder)
    return Taken(taken, str(path), read_step, with_decoder)


def pretrained_params(path: str, step: int | None, config: ModelConfig, *,
                      with_decoder: bool) -> dict[str, Any]:
    """:func:`take`'s parameters alone."""
    return take(path, step, config, with_decoder=with_decoder).params


def initial_params(fresh: dict[str, Any], config: ModelConfig, init_from: str,
                   record: dict[str, Any] | None, *, default_step: int | None = None
                   ) -> tuple[dict[str, Any], bool]:
    """(the weights a run started from, whether they were verified): ``fresh`` (the run's own
    initialisation, numpy) with the ``init_from`` weights the run's checkpoints ``record``
    placed over it. Without a record (no checkpoint yet, or one written before records), the
    config's source and ``default_step`` are read again, unverified. Raises InitFromError when
    the source no longer holds what the run took."""
    if record is not None and record.get("init_from") not in (None, init_from):
        raise InitFromError(f"init_from={init_from}: the run's checkpoints record another "
                            f"source ({record['init_from']})")
    step = record.get("init_from_step") if record is not None else default_step
    with_decoder = bool(record.get("with_decoder", True)) if record is not None else True
    taken = take(init_from, step, config, with_decoder=with_decoder)
    if record is not None and record.get("params_sha256") not in (None,
                                                                  digest(taken.params)):
        raise InitFromError(
            f"init_from={init_from}" + (f" (step {step})" if step is not None else "")
            + ": these are no longer the weights the run started from (their SHA-256 differs "
            "from the one its checkpoints record): the source was overwritten or retrained")
    out = dict(fresh)
    for k, v in taken.params.items():
        out[k] = _cast_like(v, fresh[k])
    return out, record is not None


def _cast_like(taken: Any, fresh: Any) -> Any:
    """``taken``'s arrays in ``fresh``'s dtypes (both nested dicts of numpy arrays)."""
    if isinstance(taken, dict):
        return {k: _cast_like(v, fresh[k]) for k, v in taken.items()}
    return np.asarray(taken, dtype=np.asarray(fresh).dtype)
