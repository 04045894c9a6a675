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
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from etils import epath

from mwmae import cli
from mwmae.artifact import CONFIG_FILE as ARTIFACT_CONFIG
from mwmae.artifact import ArtifactError, existing_output, replacing, save_artifact
from mwmae.data import storage
from mwmae.model.config import ModelConfig
from mwmae.workdir import CONFIG_FILE as WORKDIR_CONFIG
from mwmae.workdir import DamagedCheckpoint, Workdir, WorkdirError

# Reads of the latest step tried before giving up while a running job keeps deleting old
# checkpoints; and how long a failed read waits for a half-deleted step folder to disappear.
LATEST_TRIES = 4
DELETION_GRACE_S = 1.0


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


def _is_training_workdir(path: str) -> bool:
    if Workdir.looks_like_one(path):
        return True
    # A run before its first checkpoint: only the training config (an artifact's has "format").
    try:
        config = json.loads((epath.Path(path) / WORKDIR_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model" in config and "format" not in config


def check_output(out: str, inputs: Sequence[tuple[str, str]]) -> None:
    """Refuse (ExportError, before anything is read or written) an ``--out`` that would replace
    or mix with something that is not an artifact: one of the ``inputs`` (``(flag, path)``), a
    folder that holds one, a training workdir, a folder of other files, or a path inside an
    input. The one exception is a folder in a workdir under a name the workdir's layout does
    not use (:meth:`Workdir.owns`; a sweep's ``WORKDIR/export``). An existing artifact is left
    to :func:`mwmae.artifact.replacing` (``--overwrite``)."""
    def refuse(problem: str) -> ExportError:
        return ExportError(f"--out {out}{problem}. Nothing was written.")

    if not out.strip():
        raise ExportError("--out is empty; give the artifact's folder. Nothing was written.")
    if storage.is_remote(out):
        raise refuse(": artifacts are written to a local folder; export locally, then copy it")
    mine = os.path.realpath(out)
    for flag, path in inputs:
        if storage.is_remote(str(path)):
            continue
        theirs = os.path.realpath(path)
        if mine == theirs:
            raise refuse(f" is the {flag} itself; an artifact there would replace its files")
        if theirs.startswith(mine.rstrip(os.sep) + os.sep):
            raise refuse(f": the {flag} {path} lies inside it; an artifact there would mix "
                         "with it")
        # Inside a workdir, only under a name its layout does not use (a sweep's export/).
        if mine.startswith(theirs.rstrip(os.sep) + os.sep) and (
                flag != "--workdir" or Workdir(path).owns(mine)):
            raise refuse(f" lies inside the {flag} {path}; write the artifact elsewhere"
                         + (f" (e.g. {os.path.join(path, 'export')})" if flag == "--workdir"
                            else ""))
    if os.path.isdir(mine) and _is_training_workdir(mine):
        raise refuse(" is a training workdir; write the artifact elsewhere")
    kind, what = existing_output(mine)
    if kind == "other":
        raise refuse(f": {what}; choose a new or empty folder (--overwrite replaces only an "
                     "artifact)")


def _gone(wd: Workdir, step: int, wait: bool) -> bool:
    """Whether checkpoint ``step`` was deleted (by a running job's retention) rather than
    damaged: its folder is gone or no longer a finished step, now or (``wait``) after a short
    wait for a deletion in progress."""
    deadline = time.monotonic() + (DELETION_GRACE_S if wait else 0.0)
    while True:
        try:
            if not wd.checkpoint_path(step).exists() or step not in wd.steps():
                return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def read_checkpoint(workdir: str | epath.PathLike, step: int | None = None, *,
                    with_decoder: bool = False, log: Callable[[str], Any] = print
                    ) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Like :func:`load_training_checkpoint`, for a workdir a running job may be pruning.

    The latest step (``step`` None) that is deleted between the listing and the read is
    replaced by the newest finished one (up to ``LATEST_TRIES`` reads; ``log`` says which step
    was read instead); a chosen step that is deleted is an error naming it. A checkpoint that is
    still there but unreadable is damage and an error either way.
    """
    wd = Workdir(workdir)
    deleted: list[int] = []
    for _ in range(LATEST_TRIES if step is None else 1):
        steps = wd.steps()
        if not steps or (step is not None and step not in steps):
            break  # read_params says what is missing
        want = steps[-1] if step is None else step
        try:
            result = wd.read_params(want, with_decoder=with_decoder)
        except WorkdirError as e:
            # Files vanishing mid-read look like damage: wait briefly before believing it.
            if (not wd.path.exists() or want in deleted
                    or not _gone(wd, want, wait=isinstance(e, DamagedCheckpoint))):
                raise ExportError(str(e)) from e
            deleted.append(want)
            if step is not None:
                raise ExportError(
                    f"{wd.checkpoint_path(want)}: step {want} was deleted while it was being "
                    "read (a running job's checkpoint retention?); finished steps now: "
                    f"{wd.steps()}. Export one of those, or copy the step first.") from e
            continue
        if deleted:
            log(f"note: {wd.checkpoints}: step {', '.join(map(str, deleted))} was deleted while "
                "it was being read (the running job's checkpoint retention); exporting step "
                f"{want}, the newest finished step")
        return result
    if deleted:
        raise ExportError(f"{wd.checkpoints}: checkpoints {deleted} were deleted while being "
                          f"read; finished steps now: {wd.steps()}. Stop the run's deletions "
                          "(or copy a step) and export again.")
    return load_training_checkpoint(workdir, step, with_decoder=with_decoder)


def export_workdir(workdir: str | epath.PathLike, out: str, *, step: int | None = None,
                   with_decoder: bool = False, overwrite: bool = False,
                   log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Training workdir -> artifact in ``out``; returns the artifact's config.json.

    ``out`` must not overlap the workdir; an existing artifact there is replaced only with
    ``overwrite``, and then only once the new one is complete (see :func:`check_output`).
    """
    check_output(out, [("--workdir", str(workdir))])
    config, params, info = read_checkpoint(workdir, step, with_decoder=with_decoder, log=log)
    with replacing(out, overwrite=overwrite, name=f"--out {out}", log=log) as staging:
        save_artifact(staging, config, params, source=f"{info['workdir']}@{info['step']}",
                      extra={"step": info["step"]}, encoder_only=not with_decoder)
    return json.loads((epath.Path(out) / ARTIFACT_CONFIG).read_text())


def export_initial(workdir: str | epath.PathLike, out: str, *, with_decoder: bool = False
                   ) -> dict[str, Any]:
    """The run's initial weights -> artifact in ``out``: the network before its first step,
    the baseline that shows what training bought. That is the initialisation from
    ``key(config.seed)``, with the ``init_from`` weights laid over it when the run started
    from pretrained weights (verified against the digest its checkpoints record)."""
    import jax
    import numpy as np

    from mwmae import pretrained
    from mwmae.model import init_params

    wd = Workdir(workdir)
    try:
        config, full_config = wd.model_config()
    except WorkdirError as e:
        raise ExportError(str(e)) from e
    if "seed" not in full_config:
        raise ExportError(f"{wd.config_path}: no 'seed'; cannot recreate the initial weights")
    params = jax.tree.map(np.asarray, jax.device_get(
        init_params(config, jax.random.key(int(full_config["seed"])))))
    extra: dict[str, Any] = {"step": 0}
    if full_config.get("init_from"):
        newest = wd.newest_meta()
        record = newest[1].get("initial") if newest is not None else None
        step = full_config.get("init_from_step", -1)
        try:
            params, verified = pretrained.initial_params(
                dict(params), config, str(full_config["init_from"]), record,
                default_step=step if isinstance(step, int) and step >= 0 else None)
        except pretrained.InitFromError as e:
            raise ExportError(f"{wd}: cannot recreate the weights the run started from: "
                              f"{e}") from e
        extra["init_from"] = str(full_config["init_from"])
        extra["init_from_verified"] = verified
    save_artifact(out, config, params, source=f"{wd}@initial",
                  extra=extra, encoder_only=not with_decoder)
    return json.loads((epath.Path(out) / ARTIFACT_CONFIG).read_text())


def export_original(src: str, out: str, *, with_decoder: bool = False,
                    num_heads: int | None = None, decoder_num_heads: int | None = None,
                    overwrite: bool = False, log: Callable[[str], Any] = print
                    ) -> dict[str, Any]:
    """Original-format checkpoint directory -> artifact in ``out`` (same rules for ``out`` as
    :func:`export_workdir`)."""
    import pathlib

    from mwmae.convert import load_original

    check_output(out, [("--from-original", src)])
    config, params = load_original(src, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    with replacing(out, overwrite=overwrite, name=f"--out {out}", log=log) as staging:
        save_artifact(staging, config, params, source=str(pathlib.Path(src).resolve()),
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
    p.add_argument("--out", required=True, help="artifact directory to write (new, empty, or "
                   "an artifact with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the artifact already in --out (only an artifact; the old one "
                        "stays whole until the new one is complete)")
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
            check_output(a.out, [("--workdir", a.workdir)])
            with replacing(a.out, overwrite=a.overwrite, name=f"--out {a.out}") as staging:
                export_initial(a.workdir, str(staging), with_decoder=a.with_decoder)
            meta = json.loads((epath.Path(a.out) / ARTIFACT_CONFIG).read_text())
        elif a.workdir:
            meta = export_workdir(a.workdir, a.out, step=a.step, with_decoder=a.with_decoder,
                                  overwrite=a.overwrite)
        else:
            meta = export_original(a.from_original, a.out, with_decoder=a.with_decoder,
                                   num_heads=a.num_heads, decoder_num_heads=a.decoder_num_heads,
                                   overwrite=a.overwrite)
    except (ExportError, CheckpointError, ArtifactError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Disk full, permissions: the old artifact (if any) is untouched; say where it failed.
        print(f"error: --out {a.out}: {e}. The previous contents, if any, are unchanged.",
              file=sys.stderr)
        return 1
    kind = "encoder only" if meta["encoder_only"] else "encoder + decoder"
    print(f"exported {meta['source']} -> {a.out} ({kind}, {meta['num_params']:,} parameters, "
          f"embedding size {meta['embedding_size']}, sha256 {meta['params_sha256'][:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
