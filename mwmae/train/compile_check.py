"""Ahead-of-time check: lower and compile the train step for a target without running it.

  python -m mwmae.train.compile_check --config configs/mwmae_base_200_4x16.py --num_devices 8
  python -m mwmae.train.compile_check --config ... --topology v4:2x2x2    (needs libtpu)

Reports compile time, FLOPs and per-device memory (arguments, outputs, temporaries), so a config
that does not fit is found before a pod is rented. ``--num_devices`` fakes that many CPU devices.
"""

from __future__ import annotations

import json
import sys
import time

from mwmae.train.fake_devices import apply_num_devices_flag

if __name__ == "__main__":
    apply_num_devices_flag(sys.argv)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mwmae.train.loop import Trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
flags.DEFINE_integer("num_devices", 0, "Fake this many CPU devices (0: the real ones).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU topology, e.g. 'v4:2x2x2' (needs libtpu).")


def target_devices(topology: str) -> list:
    if not topology:
        return jax.devices()
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - which error depends on libtpu's presence
        raise SystemExit(f"cannot describe TPU topology {topology!r} here ({e}); AOT compiles "
                         "for TPU need libtpu (pip install 'jax[tpu]'); use --num_devices for "
                         "a CPU check") from e


def compile_report(config, devices) -> dict:
    t = Trainer(config, "/tmp/unused", devices=devices)
    t0 = time.perf_counter()
    lowered = t.lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    from mwmae.train import perf

    report = {
        "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(t.mesh.shape), "batch_size": config.batch_size,
        "dtype": t.model_config.dtype, "attention_impl": t.model_config.attention_impl,
        "lower_seconds": round(t1 - t0, 2), "compile_seconds": round(t2 - t1, 2),
        "flops_per_device": perf.compiled_flops(compiled),
    }
    if mem is not None:
        for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "alias_size_in_bytes", "generated_code_size_in_bytes"):
            report[k.replace("_size_in_bytes", "_mib") if "code" not in k else "code_mib"] = (
                round(getattr(mem, k, 0) / 2**20, 2))
        report["peak_estimate_mib"] = round(
            (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes) / 2**20, 2)
    return report


def main(argv: list[str]) -> None:
    del argv
    print(json.dumps(compile_report(_CONFIG.value, target_devices(_TOPOLOGY.value))))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
