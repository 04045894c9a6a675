"""Export a trained model as a self-contained artifact (see :mod:`mwmae.artifact`).

    python -m mwmae.export --workdir WORKDIR [--step N] --out DIR [--with_decoder]
    python -m mwmae.export --workdir WORKDIR --initial --out DIR
    python -m mwmae.export --from-original DIR --out DIR [--with_decoder]

A training workdir is what :func:`mwmae.train.loop.train` writes: ``config.json`` (the whole
training config; its ``model`` entry is the architecture) and ``checkpoints/<step>/state``, an
Orbax checkpoint of ``TrainState{step, params, opt_state}`` whose arrays may be sharded over
the devices of many hosts. Export runs as ONE process on any machine that can read the workdir
(local path or ``gs://``): Orbax reads every host's shards and assembles whole arrays on the
host, and only the parameters are read (the optimizer moments, twice their size, are skipped).

By default only the encoder (what embeddings need) is written; ``--with_decoder`` keeps the
decoder for reconstructions. ``--initial`` writes the run's weights before its first step (the
trainer initialises from ``key(config.seed)``): the same network untrained, the baseline that
shows what pretraining bought.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict

from mwmae.artifact import ENCODER_KEYS, ArtifactError, save_artifact
from mwmae.data import storage
from mwmae.model.config import ModelConfig


class ExportError(ValueError):
    """A workdir or checkpoint that cannot be exported; the message names the path."""


def _read_training_config(workdir: epath.Path) -> tuple[ModelConfig, dict[str, Any]]:
    cfg_path = workdir / "config.json"
    try:
        full = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise ExportError(f"{cfg_path}: missing; a training workdir has the run's config.json "
                          "beside checkpoints/") from e
    except json.JSONDecodeError as e:
        raise ExportError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(full, dict) or not isinstance(full.get("model"), dict):
        raise ExportError(f"{cfg_path}: no 'model' entry; not a training config")
    try:
        return ModelConfig.from_dict(full["model"]), full
    except (TypeError, ValueError) as e:
        raise ExportError(f"{cfg_path}: bad model config: {e}") from e


def checkpoint_steps(workdir: str | epath.PathLike) -> list[int]:
    """Finished checkpoint steps under ``WORKDIR/checkpoints``, ascending."""
    import orbax.checkpoint as ocp

    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if not ckpt_dir.exists():
        return []
    return sorted(int(s) for s in ocp.utils.checkpoint_steps(ckpt_dir))


def _tree_metadata(state_dir: epath.Path) -> Mapping[str, Any]:
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(state_dir)
    # Orbax returns a step-metadata wrapper in newer releases and the bare tree in older ones.
    item = getattr(meta, "item_metadata", meta)
    return getattr(item, "tree", item)


def load_training_checkpoint(workdir: str | epath.PathLike, step: int | None = None, *,
                             with_decoder: bool = False
                             ) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """(config, params as numpy, info) from a training workdir; the latest step by default.

    Only the encoder's parameters are read unless ``with_decoder``. Shapes are checked against
    the architecture in ``config.json`` before anything is read.
    """
    import orbax.checkpoint as ocp

    from mwmae.model import param_shapes

    workdir = epath.Path(storage.absolute(workdir))
    config, full_config = _read_training_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ExportError(f"{workdir / 'checkpoints'}: no finished checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(f"{workdir / 'checkpoints'}: no checkpoint for step {step}; "
                          f"finished steps: {steps}")
    state_dir = workdir / "checkpoints" / str(step) / "state"
    if not state_dir.exists():
        raise ExportError(f"{state_dir}: missing; expected the TrainState item of an Orbax "
                          "CheckpointManager Composite checkpoint")
    try:
        tree = _tree_metadata(state_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ExportError(f"{state_dir}: unreadable checkpoint metadata ({e})") from e
    if tree is None or "params" not in tree:
        raise ExportError(f"{state_dir}: no 'params' in the checkpoint (top-level entries: "
                          f"{sorted(tree or ())})")

    want = param_shapes(config)
    if not with_decoder:
        want = {k: v for k, v in want.items() if k in ENCODER_KEYS}
    want_flat = flatten_dict(want)
    got_flat = flatten_dict(tree["params"])
    problems = [f"missing {'/'.join(k)} {v.shape}" for k, v in want_flat.items()
                if k not in got_flat]
    problems += [f"{'/'.join(k)}: shape {tuple(got_flat[k].shape)}, config implies {v.shape}"
                 for k, v in want_flat.items()
                 if k in got_flat and tuple(got_flat[k].shape) != tuple(v.shape)]
    if problems:
        raise ExportError(f"{state_dir}: the checkpoint does not match the model in "
                          f"{workdir / 'config.json'}:\n  " + "\n  ".join(problems[:20]))

    # Whole numpy arrays on the host, whatever mesh wrote them; only the leaves asked for.
    item = {"params": unflatten_dict(
        {k: np.zeros(v.shape, v.dtype) for k, v in want_flat.items()})}
    restore_args = {"params": unflatten_dict(
        {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in want_flat})}
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                               partial_restore=True))
    params = {k: np.asarray(v, np.float32) for k, v in flatten_dict(restored["params"]).items()}
    info = {"workdir": str(workdir), "step": int(step), "seed": full_config.get("seed")}
    return config, unflatten_dict(params), info


def export_workdir(workdir: str | epath.PathLike, out: str, *, step: int | None = None,
                   with_decoder: bool = False) -> dict[str, Any]:
    """Training workdir -> artifact in ``out``; returns the artifact's config.json."""
    config, params, info = load_training_checkpoint(workdir, step, with_decoder=with_decoder)
    save_artifact(out, config, params, source=f"{info['workdir']}@{info['step']}",
                  extra={"step": info["step"]}, encoder_only=not with_decoder)
    return json.loads((epath.Path(out) / "config.json").read_text())


def export_initial(workdir: str | epath.PathLike, out: str, *, with_decoder: bool = False
                   ) -> dict[str, Any]:
    """The run's initial (untrained) weights -> artifact in ``out``; needs only config.json."""
    import jax

    from mwmae.model import init_params

    workdir = epath.Path(workdir)
    config, full_config = _read_training_config(workdir)
    if "seed" not in full_config:
        raise ExportError(f"{workdir / 'config.json'}: no 'seed'; cannot recreate the initial "
                          "weights")
    params = jax.device_get(init_params(config, jax.random.key(int(full_config["seed"]))))
    save_artifact(out, config, params, source=f"{workdir}@initial",
                  extra={"step": 0}, encoder_only=not with_decoder)
    return json.loads((epath.Path(out) / "config.json").read_text())


def export_original(src: str, out: str, *, with_decoder: bool = False,
                    num_heads: int | None = None, decoder_num_heads: int | None = None
                    ) -> dict[str, Any]:
    """Original-format checkpoint directory -> artifact in ``out``."""
    import pathlib

    from mwmae.convert import load_original

    config, params = load_original(src, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    save_artifact(out, config, params, source=str(pathlib.Path(src).resolve()),
                  encoder_only=not with_decoder)
    return json.loads((epath.Path(out) / "config.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.export",
                                description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (local or gs://)")
    src.add_argument("--from-original", "--from_original", dest="from_original",
                     help="original-format checkpoint directory (checkpoint_<step> + config.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--initial", action="store_true",
                   help="--workdir only: the run's untrained initial weights (a baseline)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--with_decoder", "--with-decoder", action="store_true",
                   help="also write the decoder weights (for reconstructions)")
    p.add_argument("--num_heads", type=int, default=None,
                   help="original checkpoints only: encoder heads, if not the paper's")
    p.add_argument("--decoder_num_heads", type=int, default=None)
    a = p.parse_args(argv)
    if a.from_original and a.step is not None:
        p.error("--step applies to --workdir; an original directory exports its latest step")
    if a.initial and (not a.workdir or a.step is not None):
        p.error("--initial needs --workdir and no --step")

    from mwmae.convert import CheckpointError

    try:
        if a.initial:
            meta = export_initial(a.workdir, a.out, with_decoder=a.with_decoder)
        elif a.workdir:
            meta = export_workdir(a.workdir, a.out, step=a.step, with_decoder=a.with_decoder)
        else:
            meta = export_original(a.from_original, a.out, with_decoder=a.with_decoder,
                                   num_heads=a.num_heads, decoder_num_heads=a.decoder_num_heads)
    except (ExportError, CheckpointError, ArtifactError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = "encoder only" if meta["encoder_only"] else "encoder + decoder"
    print(f"exported {meta['source']} -> {a.out} ({kind}, {meta['num_params']:,} parameters, "
          f"embedding size {meta['embedding_size']}, sha256 {meta['params_sha256'][:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
