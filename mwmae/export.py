"""Export a trained model as a self-contained artifact (see :mod:`mwmae.artifact`).

    python -m mwmae.export --workdir WORKDIR [--step N] --out DIR [--with-decoder]
    python -m mwmae.export --workdir WORKDIR --initial --out DIR
    python -m mwmae.export --from-original DIR --out DIR [--with-decoder]

A training workdir is what :func:`mwmae.train.loop.train` writes (its layout belongs to
:mod:`mwmae.workdir`): the run's config and Orbax checkpoints of the TrainState, whose arrays
may be sharded over the devices of many hosts. Export runs as ONE process on any machine that
can read the workdir (local path or ``gs://``): Orbax reads every host's shards and assembles
whole arrays on the host, and only the parameters are read (the optimizer moments, twice their
size, are skipped).

By default only the encoder (what embeddings need) is written; ``--with-decoder`` keeps the
decoder for reconstructions. ``--initial`` writes the run's weights before its first step (the
trainer initialises from ``key(config.seed)``): the same network untrained, the baseline that
shows what pretraining bought.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from etils import epath

from mwmae import cli
from mwmae.artifact import CONFIG_FILE as ARTIFACT_CONFIG
from mwmae.artifact import ArtifactError, save_artifact
from mwmae.model.config import ModelConfig
from mwmae.workdir import Workdir, WorkdirError


class ExportError(ValueError):
    """A workdir or checkpoint that cannot be exported; the message names the path."""


def load_training_checkpoint(workdir: str | epath.PathLike, step: int | None = None, *,
                             with_decoder: bool = False
                             ) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """(config, params as numpy, info) from a training workdir; the latest step by default.

    Only the encoder's parameters are read unless ``with_decoder``; shapes are checked against
    the architecture in the workdir's config before anything is read, and the arrays against
    the checksums recorded at save (see :meth:`mwmae.workdir.Workdir.read_params`).
    """
    try:
        return Workdir(workdir).read_params(step, with_decoder=with_decoder)
    except WorkdirError as e:
        raise ExportError(str(e)) from e


def export_workdir(workdir: str | epath.PathLike, out: str, *, step: int | None = None,
                   with_decoder: bool = False) -> dict[str, Any]:
    """Training workdir -> artifact in ``out``; returns the artifact's config.json."""
    config, params, info = load_training_checkpoint(workdir, step, with_decoder=with_decoder)
    save_artifact(out, config, params, source=f"{info['workdir']}@{info['step']}",
                  extra={"step": info["step"]}, encoder_only=not with_decoder)
    return json.loads((epath.Path(out) / ARTIFACT_CONFIG).read_text())


def export_initial(workdir: str | epath.PathLike, out: str, *, with_decoder: bool = False
                   ) -> dict[str, Any]:
    """The run's initial (untrained) weights -> artifact in ``out``; needs only config.json."""
    import jax

    from mwmae.model import init_params

    wd = Workdir(workdir)
    try:
        config, full_config = wd.model_config()
    except WorkdirError as e:
        raise ExportError(str(e)) from e
    if "seed" not in full_config:
        raise ExportError(f"{wd.config_path}: no 'seed'; cannot recreate the initial weights")
    params = jax.device_get(init_params(config, jax.random.key(int(full_config["seed"]))))
    save_artifact(out, config, params, source=f"{wd}@initial",
                  extra={"step": 0}, encoder_only=not with_decoder)
    return json.loads((epath.Path(out) / ARTIFACT_CONFIG).read_text())


def export_original(src: str, out: str, *, with_decoder: bool = False,
                    num_heads: int | None = None, decoder_num_heads: int | None = None
                    ) -> dict[str, Any]:
    """Original-format checkpoint directory -> artifact in ``out``."""
    import pathlib

    from mwmae.convert import load_original

    config, params = load_original(src, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    save_artifact(out, config, params, source=str(pathlib.Path(src).resolve()),
                  encoder_only=not with_decoder)
    return json.loads((epath.Path(out) / ARTIFACT_CONFIG).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.export",
                                description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (local or gs://)")
    src.add_argument("--from-original", dest="from_original",
                     help="original-format checkpoint directory (checkpoint_<step> + config.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--initial", action="store_true",
                   help="--workdir only: the run's untrained initial weights (a baseline)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--with-decoder", action="store_true",
                   help="also write the decoder weights (for reconstructions)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="original checkpoints only: encoder heads, if not the paper's")
    p.add_argument("--decoder-num-heads", type=int, default=None)
    a = cli.parse_args(p, argv)
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
