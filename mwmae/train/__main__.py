"""python -m mwmae.train --config configs/tiny.py --workdir DIR [--config.key=value ...]"""

from absl import app, flags, logging
from ml_collections import config_flags

from mwmae.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    # Orbax and JAX log every save at INFO; the loop prints what a user needs.
    logging.set_verbosity(logging.WARNING)
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
