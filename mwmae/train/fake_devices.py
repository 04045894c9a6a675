"""``--num_devices N`` for CLIs that check a mesh on one CPU: must act before jax is imported."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from mwmae.cli import absl_spelling


def apply_num_devices_flag(argv: list[str]) -> None:
    """Turn ``--num_devices N`` into N fake CPU devices (XLA reads this at backend start)."""
    argv = absl_spelling(argv)
    for i, a in enumerate(argv):
        n = a.split("=", 1)[1] if a.startswith("--num_devices=") else (
            argv[i + 1] if a == "--num_devices" and i + 1 < len(argv) else None)
        if n and int(n) > 0:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + f" --xla_force_host_platform_device_count={int(n)}")


def apply_gpu_flag(argv: list[str]) -> None:
    """With ``--gpu KIND`` (a compile for GPUs that are not here) keep JAX on its CPU backend:
    the CUDA plugin, finding no driver, would otherwise fail to start and take the deviceless
    GPU topology with it."""
    argv = absl_spelling(argv)
    wanted = any((a.startswith("--gpu=") and len(a) > len("--gpu=")) or
                 (a == "--gpu" and i + 1 < len(argv) and argv[i + 1])
                 for i, a in enumerate(argv))
    if not wanted:
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: its config read the variable at import
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def run_config_tool(main: Callable[[list[str]], None]) -> None:
    """Console entry of a ``--config`` tool that takes ``--num_devices``: the flag acts before the
    backend starts (JAX is imported by then, but its devices are not created yet). Hyphenated
    spellings of the tool's flags (``--num-devices``) are accepted."""
    from absl import app, flags

    from mwmae.cli import absl_flags_parser

    sys.argv[1:] = absl_spelling(sys.argv[1:])
    apply_num_devices_flag(sys.argv)
    apply_gpu_flag(sys.argv)
    flags.mark_flag_as_required("config")
    # --help exits 0 listing the tool's own flags, as the trainer's does.
    doc = getattr(sys.modules.get(main.__module__), "__doc__", None)
    app.run(main, flags_parser=absl_flags_parser(doc, "config"))
