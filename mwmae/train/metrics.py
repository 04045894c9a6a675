"""What the trainer reports, averaged how, under which TensorBoard tag.

Loss and norms are averaged over every step of a log interval (``clu.metrics``), counting only
steps whose update was applied: a dropped non-finite step would otherwise turn the average into
NaN for the whole interval. The step's metrics reach the host one step late, so reading them
never waits for the step that is running.
"""

from typing import Any

import flax
import jax
import numpy as np
from clu import metrics as clu_metrics

from mwmae import goodput

# Every scalar the trainer writes, by dashboard group; the tag is "<group>/<name>".
GROUPS: dict[str, tuple[str, ...]] = {
    "train": ("loss", "grad_norm", "param_norm", "learning_rate", "skipped_steps"),
    # goodput*: shares of the whole run's wall time, over its restarts (mwmae.goodput).
    "perf": ("steps_per_sec", "examples_per_sec", "examples_per_sec_per_device", "mfu",
             "compile_seconds", *goodput.FRACTIONS),
    "data": ("input_wait_ms_per_step", "input_wait_fraction", "skipped_records"),
    "checkpoint": ("save_seconds",),
    # A tagger's held-out evaluation (mwmae.finetune): over the whole split, never per batch.
    "eval": ("mAP", "mAUC", "d_prime", "classes_scored", "top1", "clips", "eval_seconds"),
}
_GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}
IMAGE_TAG = "train/reconstruction"


def tagged(scalars: dict[str, float]) -> dict[str, float]:
    """``{"loss": x}`` -> ``{"train/loss": x}``; a name without a group is an error, so a new
    metric is given one on purpose."""
    unknown = sorted(set(scalars) - set(_GROUP_OF))
    if unknown:
        raise KeyError(f"metrics without a dashboard group: {unknown}; add them to "
                       "mwmae.train.metrics.GROUPS")
    return {f"{_GROUP_OF[k]}/{k}": v for k, v in scalars.items()}


# clu reads the field annotations as metric classes: no postponed annotations in this module.
@flax.struct.dataclass
class _Averages(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    param_norm: clu_metrics.Average.from_output("param_norm")


class IntervalMetrics:
    """Accumulates each step's metrics; :meth:`flush` gives the interval's values."""

    def __init__(self) -> None:
        self._cpu = jax.local_devices(backend="cpu")[0]
        self._pending: Any = None
        self._averages: _Averages | None = None
        self._last: dict[str, float] = {}
        self.steps = 0

    def add(self, step_metrics: Any) -> None:
        """Take this step's (device) metrics; the previous step's are read now."""
        self._merge_pending()
        self._pending = step_metrics

    def flush(self) -> dict[str, float]:
        """Averages over the interval's applied steps; learning rate and the skipped-step
        counter as of the last step."""
        self._merge_pending()
        values = {k: float(v) for k, v in self._averages.compute().items()}
        values.update(self._last)
        self._averages, self.steps = None, 0
        return values

    def _merge_pending(self) -> None:
        if self._pending is None:
            return
        m = {k: np.asarray(v) for k, v in jax.device_get(self._pending).items()}
        self._pending = None
        finite = np.isfinite(m["loss"]) & np.isfinite(m["grad_norm"])
        with jax.default_device(self._cpu):
            one = _Averages.single_from_model_output(
                mask=np.atleast_1d(finite),
                **{k: np.atleast_1d(m[k]).astype(np.float32) for k in ("loss", "grad_norm",
                                                                        "param_norm")})
            self._averages = one if self._averages is None else self._averages.merge(one)
        self._last = {"learning_rate": float(m["learning_rate"]),
                      "skipped_steps": float(m["skipped_steps"])}
        self.steps += 1


def hparams(config: Any) -> dict[str, Any]:
    """The run's config flattened to ``{"a.b": value}`` for TensorBoard's HParams tab
    (numbers, strings and booleans as they are; anything else as text)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool | int | float | str):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", config.to_dict())
    return flat
