"""Print the partition spec of every parameter for a config and mesh.

  python -m mwmae.train.partitioning --config configs/mwmae_base_200_4x16.py \\
      --config.mesh.preset=fsdp_tp --num_devices 8
"""

from __future__ import annotations

import sys

from mwmae.train.fake_devices import apply_num_devices_flag, run_config_tool

if __name__ == "__main__":
    apply_num_devices_flag(sys.argv)

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mwmae.train import sharding  # noqa: E402
from mwmae.train.engine import Engine  # noqa: E402
from mwmae.train.pretraining import Pretraining  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
flags.DEFINE_integer("num_devices", 0, "Fake this many CPU devices (0: the real ones).")


def main(argv: list[str]) -> None:
    del argv
    t = Engine(Pretraining(_CONFIG.value), "/tmp/unused")
    print(f"mesh {dict(t.mesh.shape)}")
    specs = sharding.describe(t.state_sharding.params)
    width = max(map(len, specs))
    for name, spec in specs.items():
        print(f"{name:<{width}}  {spec}")


def run() -> None:
    run_config_tool(main)


if __name__ == "__main__":
    run()
