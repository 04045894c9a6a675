"""The weights to analyse, through the project's own readers: an exported artifact (or the
original released checkpoint format) or a step of a training workdir."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from mwmae import artifact
from mwmae.analysis.errors import AnalysisError
from mwmae.model import ModelConfig, param_problems, param_shapes
from mwmae.workdir import Workdir, WorkdirError


@dataclasses.dataclass(frozen=True)
class Weights:
    config: ModelConfig
    params: dict[str, Any]
    front_end: dict[str, Any]  # what the model's input was made with (mwmae.artifact.front_end)
    source: str
    step: int | None
    # Why there is no decoder and what to do, when there is none; "" when there is one.
    no_decoder: str

    @property
    def has_decoder(self) -> bool:
        return not self.no_decoder


def _has_decoder(config: ModelConfig, params: dict[str, Any]) -> bool:
    return set(param_shapes(config)) <= set(params)


def from_artifact(path: str) -> Weights:
    """An mwmae artifact directory, or an original-format checkpoint directory
    (``checkpoint_<step>`` + ``config.json``, always with its decoder)."""
    from mwmae.convert import _CKPT_RE, CheckpointError, load_original

    directory = pathlib.Path(path)
    if not directory.exists():
        raise AnalysisError(f"--artifact {path}: no such directory")
    # As mwmae.load decides: an artifact (or a damaged one) first, then the original format.
    maybe_artifact = artifact.is_artifact(directory) or artifact.has_weights_file(directory)
    if not maybe_artifact and directory.is_dir() and any(
            _CKPT_RE.match(p.name) for p in directory.iterdir()):
        try:
            config, params = load_original(directory)
        except CheckpointError as e:
            raise AnalysisError(str(e)) from e
        return Weights(config, params, artifact.front_end(), str(directory), None, "")
    try:
        config, params, meta = artifact.load_artifact(directory)
    except artifact.ArtifactError as e:
        raise AnalysisError(str(e)) from e
    encoder_only = bool(meta.get("encoder_only"))
    problems = param_problems(config, params, encoder_only=encoder_only)
    if problems:
        raise AnalysisError(f"{directory / meta['params_file']}: the weights do not match "
                            f"{artifact.CONFIG_FILE}: {'; '.join(problems[:5])}")
    no_decoder = ""
    if encoder_only:
        no_decoder = (f"{directory / artifact.CONFIG_FILE}: an encoder-only artifact (no decoder "
                      "weights), so its decoder cannot be analysed; pass the training run with "
                      "--workdir (or an artifact exported with --with-decoder), or --part encoder")
    return Weights(config, params, dict(meta.get("front_end") or artifact.front_end()),
                   str(directory), meta.get("step"), no_decoder)


def from_workdir(path: str, step: int | None = None) -> Weights:
    """One checkpoint of a training workdir (the latest by default), with the decoder when the
    checkpoint has one (a pretraining run's does, a fine-tuning run's does not)."""
    workdir = Workdir(path)
    try:
        config, params, info = workdir.read_params(step, with_decoder=None)
    except WorkdirError as e:
        raise AnalysisError(str(e)) from e
    no_decoder = ""
    if not _has_decoder(config, params):
        no_decoder = (f"{workdir.checkpoint_path(info['step'])}: the checkpoint has no decoder "
                      "weights (not a pretraining run), so there is no decoder to analyse; "
                      "use --part encoder")
    # Workdirs are trained on shards of this project's front end.
    return Weights(config, params, artifact.front_end(), str(workdir), info["step"], no_decoder)
