"""Start a run from pretrained weights (``config.init_from``): an exported artifact, an
original-format checkpoint directory (the released weights) or a pretraining workdir.

The weights replace the freshly initialised ones entry by entry (encoder, and the decoder too when
the source has one and the run wants it); the optimizer starts fresh. Only a run's first start
reads them: a resumed run continues from its own checkpoint.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
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


def read_source(path: str, step: int | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """(the source's model config, its parameters as numpy) for any of the three sources."""
    from mwmae import api
    from mwmae.workdir import Workdir, WorkdirError

    local = pathlib.Path(path)
    if not str(path).startswith("gs://") and not local.exists():
        raise InitFromError(f"init_from={path}: no such file or directory")
    if Workdir.looks_like_one(path):
        try:
            config, params, _ = Workdir(path).read_params(step, with_decoder=None)
        except WorkdirError as e:
            raise InitFromError(f"init_from={path}: {e}") from e
        return config, params
    if step is not None:
        raise InitFromError(f"init_from={path}: init_from_step={step} applies to a training "
                            "workdir only; this is an artifact or original checkpoint")
    try:
        model = api.load(path)
    except Exception as e:  # noqa: BLE001 - every loader error says what it found
        raise InitFromError(f"init_from={path}: {e}") from e
    import jax

    return model.config, jax.tree.map(np.asarray, dict(model.params))


def pretrained_params(path: str, step: int | None, config: ModelConfig, *,
                      with_decoder: bool) -> dict[str, Any]:
    """The top-level parameter entries of ``path`` that this run takes over: the encoder's, and
    with ``with_decoder`` the decoder's when the source has them (an encoder-only source leaves
    the run's fresh decoder). Raises :class:`InitFromError` naming every mismatch."""
    source_config, params = read_source(path, step)
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
    return taken


def place(fresh: Mapping[str, Any], shardings: Mapping[str, Any], taken: Mapping[str, Any]
          ) -> dict[str, Any]:
    """``fresh`` (global arrays) with its top-level entries replaced by ``taken``'s (numpy, the
    same on every host), cast to fresh's dtypes and laid out with ``shardings``."""
    import jax

    def put(t, f, s):
        t = np.asarray(t, dtype=f.dtype)
        return jax.make_array_from_callback(f.shape, s, lambda index: t[index])

    out = dict(fresh)
    for k, v in taken.items():
        out[k] = jax.tree.map(put, v, fresh[k], shardings[k])
    return out
