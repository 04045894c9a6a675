"""Parameter counts of a config's model, per top-level part.

  python -m mwmae.model_info --config configs/mwmae_base_200_4x16.py
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mwmae.cli import absl_flags_parser
from mwmae.model import ModelConfig, param_shapes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """{part: count} for each top-level parameter group, plus 'total'."""
    shapes = param_shapes(config)
    counts = {k: int(sum(np.prod(x.shape) for x in jax.tree.leaves(v)))
              for k, v in shapes.items()}
    counts["total"] = sum(counts.values())
    return counts


def main(argv: list[str]) -> None:
    del argv
    model_config = ModelConfig.from_dict(_CONFIG.value.model.to_dict())
    counts = parameter_counts(model_config)
    if _JSON.value:
        print(json.dumps({"model": model_config.to_dict(), "parameters": counts}))
        return
    width = max(map(len, counts))
    for k, v in counts.items():
        print(f"{k:<{width}}  {v:>14,}")


def run() -> None:
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=absl_flags_parser(__doc__, "config"))


if __name__ == "__main__":
    run()
