"""Everything a lent GPU (or TPU) host should measure, in one command that fits its few minutes.

  benchmarks/accelerator_check.sh OUTDIR [PYTHON]             # on the accelerator host
  benchmarks/accelerator_check.sh OUTDIR [PYTHON] --cpu-smoke  # every stage at toy size, on CPU

Stages, each a child process with its own time limit and log (``OUTDIR/<stage>.log``); a failing
stage does not stop the next, and ``OUTDIR/summary.json`` records each one's exit status, seconds
and files. ``STAGES="sweep profile"`` runs a subset (in this order whatever the spelling);
``KIT_BUDGET_S`` (default 540) is the whole run's time, which the sweep shares with the rest.

1. ``environment``: versions, devices, cores (``environment.json``).
2. ``target``: the device's own target description (``target.txtpb``, the text proto XLA
   compiles GPU code for). With it ``compile_check --gpu OUTDIR/target.txtpb`` compiles here for
   exactly that device.
3. ``autotune``: the base step compiled once on the device with XLA's GEMM autotuning results
   dumped (``autotune.textproto``). Loaded here with ``--xla_gpu_load_autotune_results_from``,
   deviceless compiles then get the device's tilings instead of the fallback.
4. ``kernel_tests``: the compiled attention kernels' property tests (tests/test_kernels_pallas.py).
5. ``preflight``: ``mwmae.preflight`` on the base config (``preflight.json``: step time,
   attention choice per layer measured on the device, input and storage).
6. ``sweep``: the base step in bfloat16 over batch (256/512/1024), attention (auto, the kernel,
   XLA), layers scanned or unrolled and XLA flag sets, within its share of the budget, best first
   (``sweep.jsonl``, ``best.json``).
7. ``profile``: the best variant traced (``jax.profiler``), its top operations by device time
   (``profile_top.json``).
8. ``input``: the input pipeline with every core of the host against what the best step consumes
   (``input.json``).
9. ``hear_embed``: HEAR embedding throughput, JAX and PyTorch backends (``hear_embed.json``).
10. ``autocast``: the PyTorch encoder's features under bfloat16 and float16 autocast on the device
    against float32, on the original checkpoint (``autocast.json``).

The lent machine has no network: what its image lacks travels as wheels (``benchmarks/
kit_wheels.sh`` fills ``wheels/``; the kit installs them first when the folder is there).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
ORDER = ("environment", "target", "autotune", "kernel_tests", "preflight", "sweep", "profile",
         "input", "hear_embed", "autocast")
# What the stages after the sweep are expected to take on an accelerator: the sweep leaves it.
RESERVE = {"profile": 45, "input": 30, "hear_embed": 60, "autocast": 30}
# Seconds per stage on an accelerator at most (the sweep takes what the budget leaves it).
LIMITS = {"environment": 60, "target": 60, "autotune": 120, "kernel_tests": 150,
          "preflight": 150, "sweep": 0, "profile": 90, "input": 90, "hear_embed": 120,
          "autocast": 90}
BASE = "configs/mwmae_base_200_4x16.py"
TINY = "configs/tiny.py"
# XLA flag sets the sweep compares (GPU flags; harmless elsewhere).
FLAG_SETS = {"default": "", "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false"}


# ---------------------------------------------------------------------------- the stages (child)

def stage_environment(out: pathlib.Path, smoke: bool) -> None:
    import jax

    info = {"jax": jax.__version__, "python": sys.version.split()[0],
            "backend": jax.default_backend(), "cores": os.cpu_count(),
            "devices": [d.device_kind for d in jax.devices()], "smoke": smoke}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        info["torch"] = None
    _write(out / "environment.json", info)


def stage_target(out: pathlib.Path, smoke: bool) -> None:
    import jax
    from jax._src.lib import xla_client

    topology = xla_client.get_topology_for_devices(jax.devices())
    text = getattr(topology, "target_config", None)
    if text is None:
        why = (f"jax {jax.__version__} on {jax.default_backend()} gives no target description "
               "(GPU hosts only)")
        _write(out / "target.json", {"available": False, "why": why})
        if jax.default_backend() == "gpu":
            raise SystemExit(why)
        return
    (out / "target.txtpb").write_text(
        f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, written by the accelerator "
        f"kit on {time.strftime('%Y-%m-%d')}\n{text}")
    _write(out / "target.json", {"available": True, "device": jax.devices()[0].device_kind})


def stage_autotune(out: pathlib.Path, smoke: bool) -> None:
    # XLA_FLAGS (with the dump file) was set by the parent before this process started.
    row = _bench(TINY if smoke else BASE, 4 if smoke else 512, "auto", 1, steps=1)
    dump = out / "autotune.textproto"
    _write(out / "autotune.json", {"step": row, "dump": dump.name if dump.exists() else None,
                                   "bytes": dump.stat().st_size if dump.exists() else 0})


def stage_kernel_tests(out: pathlib.Path, smoke: bool) -> None:
    # On an accelerator the test file adds the backend's compiled kernel to its parameters;
    # the interpreted cases are CI's. The smoke run takes a few quick cases of the same file.
    select = "dispatch_on_cpu or additive_matrix" if smoke else "not interpret and not benchmark"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_kernels_pallas.py", "-k", select]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    (out / "kernel_tests.txt").write_text(proc.stdout[-20000:])
    print(proc.stdout[-3000:], proc.stderr[-2000:])
    if proc.returncode:
        raise SystemExit(proc.returncode)


def stage_preflight(out: pathlib.Path, smoke: bool) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "mwmae.preflight", "--config", TINY if smoke else BASE,
               "--workdir", workdir, "--out", str(out / "preflight.json")]
        if smoke:
            cmd.append("--config.batch_size=8")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    print(proc.stdout[-5000:], proc.stderr[-3000:])
    # Exit 1 is a report with failed checks (still written); anything else is a crash.
    if proc.returncode not in (0, 1) or not (out / "preflight.json").exists():
        raise SystemExit(f"the preflight exited {proc.returncode} without a report")


def stage_sweep(out: pathlib.Path, smoke: bool, budget: float) -> None:
    """Batch first (with "auto"), then attention and unrolling at the best batch, then flags."""
    import itertools

    start = time.monotonic()
    config = TINY if smoke else BASE
    rows: list[dict] = []

    def run(batch: int, attention: str, unroll: int, flags: str) -> None:
        left = budget - (time.monotonic() - start)
        if left < 20:
            return
        cmd = [sys.executable, __file__, "--child", "sweep_one", str(out), "--config", config,
               "--batch", str(batch), "--attention", attention, "--unroll", str(unroll)]
        env = {**os.environ, "XLA_FLAGS": " ".join(filter(None, (
            os.environ.get("XLA_FLAGS", ""), FLAG_SETS[flags])))}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=min(left, 240))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1][-300:]}
        except subprocess.TimeoutExpired:
            row = {"error": "timed out"}
        row.update(variant={"batch": batch, "attention": attention, "unroll": unroll,
                            "flags": flags})
        rows.append(row)
        with open(out / "sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def best() -> dict:
        done = [r for r in rows if "examples_per_s" in r]
        return max(done, key=lambda r: r["examples_per_s"]) if done else {}

    for batch in ((4,) if smoke else (256, 512, 1024)):
        run(batch, "auto", 1, "default")
    top = best().get("variant", {}).get("batch")
    if top:
        variants = ([("xla", 0)] if smoke else
                    [v for v in itertools.product(("auto", "pallas_gpu", "xla"), (1, 0))
                     if v != ("auto", 1)])
        for attention, unroll in variants:
            run(top, attention, unroll, "default")
        b = best()["variant"]
        for flags in FLAG_SETS:
            if flags != "default":
                run(b["batch"], b["attention"], b["unroll"], flags)
    if not best():
        raise SystemExit("no variant of the step ran")
    _write(out / "best.json", best())


def stage_sweep_one(out: pathlib.Path, smoke: bool, a: argparse.Namespace) -> None:
    print(json.dumps(_bench(a.config, a.batch, a.attention, a.unroll, steps=3 if smoke else 10)))


def stage_profile(out: pathlib.Path, smoke: bool) -> None:
    import gzip

    import jax

    best = json.loads((out / "best.json").read_text()) if (out / "best.json").exists() else {}
    v = best.get("variant", {"batch": 4 if smoke else 512, "attention": "auto", "unroll": 1})
    trace_dir = out / "profile_trace"
    run_steps = _bench(TINY if smoke else BASE, v["batch"], v["attention"], v["unroll"],
                       steps=2 if smoke else 5, trace=trace_dir)
    traces = sorted(trace_dir.rglob("*.trace.json.gz"))
    if not traces:
        raise SystemExit(f"jax.profiler wrote no trace under {trace_dir}")
    with gzip.open(traces[-1]) as f:
        events = json.load(f).get("traceEvents", [])
    # Device work: the process names that hold the accelerator's streams (or, on CPU, XLA ops).
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in names.items() if "/device:" in n and "CPU" not in n}
    total: dict[str, float] = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device_pids and e["pid"] not in device_pids:
            continue
        total[e["name"]] = total.get(e["name"], 0.0) + float(e["dur"])
    top = sorted(total.items(), key=lambda kv: -kv[1])[:25]
    _write(out / "profile_top.json", {
        "variant": v, "step": run_steps, "jax": jax.__version__,
        "device_streams": sorted(names[p] for p in device_pids),
        "top_ms": [{"op": k, "ms": round(t / 1e3, 3)} for k, t in top]})


def stage_input(out: pathlib.Path, smoke: bool) -> None:
    """The pipeline's examples/s with every core on random TFRecord shards, against what the
    best step consumes."""
    import tempfile

    cores = os.cpu_count() or 1
    clips, batch = (64, 8) if smoke else (4096, 256)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _random_shards(pathlib.Path(tmp), clips, shards=8)
        rate = _pipeline_rate(manifest, batch, workers=cores, batches=4 if smoke else 40)
    best = json.loads((out / "best.json").read_text()) if (out / "best.json").exists() else {}
    step_rate = best.get("examples_per_s")
    _write(out / "input.json", {
        "cores": cores, "workers": cores, "batch": batch, "examples_per_s": rate,
        "examples_per_s_per_core": round(rate / cores, 1), "step_examples_per_s": step_rate,
        # Below 1 the step waits for input at this core count.
        "input_over_step": round(rate / step_rate, 2) if step_rate else None})


def stage_hear_embed(out: pathlib.Path, smoke: bool) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "hear_embed.py"),
           "--size", "tiny" if smoke else "base", "--clips", "2" if smoke else "10",
           "--batches", "1,4" if smoke else "1,32", "--dtypes", "float32,bfloat16",
           "--repeats", "1" if smoke else "2", "--backends", "jax,torch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    (out / "hear_embed.json").write_text(proc.stdout)


def stage_autocast(out: pathlib.Path, smoke: bool) -> None:
    import lzma
    import shutil
    import tempfile

    import numpy as np
    import torch

    import mwmae
    import mwmae.torch as mt
    from mwmae.model import encoder_keys

    ref = REPO / "tests" / "fixtures" / "reference" / "original_A"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        with lzma.open(ref / "checkpoint" / "checkpoint_0.xz") as src, \
                open(pathlib.Path(tmp) / "checkpoint_0", "wb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.copy(ref / "checkpoint" / "config.json", pathlib.Path(tmp) / "config.json")
        model = mwmae.load(tmp)
    from flax.traverse_util import flatten_dict

    params = {"/".join(k): np.asarray(v) for k, v in flatten_dict(model.params).items()
              if k[0] in encoder_keys(model.config)}
    encoder = mt.Encoder.from_params(model.config, params).to(device).eval()
    x = torch.from_numpy(np.load(ref / "fixtures.npz")["input"]).to(device)
    with torch.no_grad():
        full = encoder(x).float()
        rows = {}
        for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            with torch.autocast(device, dtype=dtype):
                low = encoder(x).float()
            diff = (low - full).abs()
            rows[name] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    _write(out / "autocast.json", {"device": device, "torch": torch.__version__,
                                   "against_float32": rows,
                                   "cpu_tolerance_in_tests": {"bfloat16": [0.1, 0.012],
                                                              "float16": [0.02, 0.002]}})


# ---------------------------------------------------------------------------- helpers

def _write(path: pathlib.Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def _bench(config_path: str, batch: int, attention: str, unroll: int, steps: int,
           trace: pathlib.Path | None = None) -> dict:
    """The train step of a config file in bfloat16 on one device: compile, then ``steps``."""
    import statistics

    import jax
    from ml_collections import config_flags  # noqa: F401 - the configs import it

    from mwmae.data.sources import synthetic_source
    from mwmae.train import perf
    from mwmae.train.engine import Engine
    from mwmae.train.pretraining import Pretraining

    config = _load_config(config_path)
    config.batch_size = batch
    config.model.dtype = "bfloat16"
    config.model.attention_impl = attention
    config.model.scan_unroll = unroll or max(config.model.depth, config.model.decoder_depth)
    engine = Engine(Pretraining(config), "/tmp/unused", devices=jax.devices()[:1])
    state = engine.initial_state()
    t0 = time.perf_counter()
    compiled = engine.compile(state)
    compile_s = time.perf_counter() - t0
    source = synthetic_source(batch, config.seed, *config.model.img_size)
    batches = [engine.global_batch(next(source)) for _ in range(2)]
    state, m = compiled(state, batches[0])  # warm up
    jax.block_until_ready(m)
    times = []
    if trace is not None:
        jax.profiler.start_trace(str(trace), create_perfetto_trace=True)
    for i in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batches[i % 2])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    if trace is not None:
        jax.profiler.stop_trace()
    step_s = statistics.median(times)
    flops = perf.train_flops_per_example(engine.model_config) * batch
    peak = perf.device_peak_flops(dtype="bfloat16")
    return {"config": config_path, "batch": batch, "attention_plan": {
                d.layer.name: d.implementation for d in engine.attention.decisions},
            "device": jax.devices()[0].device_kind, "compile_s": round(compile_s, 2),
            "step_s_median": round(step_s, 5), "examples_per_s": round(batch / step_s, 1),
            "mfu": round(flops / step_s / peak, 4), "loss": float(m["loss"])}


def _load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("kit_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _random_shards(folder: pathlib.Path, clips: int, shards: int) -> str:
    """TFRecord shards of random 230-frame log-mel clips and their manifest."""
    import numpy as np

    from mwmae.data import ShardSet, records

    rng = np.random.default_rng(0)
    rows = ["shard,num_records"]
    for s in range(shards):
        name, count = f"clips-{s}.tfrecord", clips // shards
        with open(folder / name, "wb") as f:
            writer = records.TFRecordWriter(f)
            for k in range(count):
                writer.write(records.encode_example(
                    rng.normal(size=(230, 80)).astype(np.float32), [k % 10]))
            writer.close()
        rows.append(f"{name},{count}")
    manifest = ShardSet(str(folder), "clips").manifest
    pathlib.Path(manifest).write_text("\n".join(rows) + "\n")
    return manifest


def _pipeline_rate(manifest: str, batch: int, workers: int, batches: int) -> float:
    from mwmae.data import PipelineConfig, make_input_iterator

    config = PipelineConfig(global_batch_size=batch, num_workers=workers, shuffle_buffer=256)
    it = make_input_iterator(manifest, config, process_index=0, process_count=1)
    next(it)  # the workers start
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return round(batch * batches / (time.perf_counter() - t0), 1)


# ---------------------------------------------------------------------------- the parent

def run_all(out: pathlib.Path, smoke: bool, stages: list[str], budget: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
        str(REPO), os.environ.get("PYTHONPATH", "")))), "PYTHONUNBUFFERED": "1",
        # Both backends may share the device in one stage: no JAX preallocation.
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
    start = time.monotonic()
    summary: dict = {"smoke": smoke, "stages": {}}
    for name in stages:
        left = budget - (time.monotonic() - start)
        limit = LIMITS[name] or max(30.0, left - sum(RESERVE.get(s, 0) for s in stages
                                                    if ORDER.index(s) > ORDER.index(name)))
        limit = min(limit, max(left, 1.0))
        stage_env = dict(env)
        if name == "autotune":
            stage_env["XLA_FLAGS"] = " ".join(filter(None, (
                env.get("XLA_FLAGS", ""),
                f"--xla_gpu_dump_autotune_results_to={out / 'autotune.textproto'}")))
        cmd = [sys.executable, __file__, "--child", name, str(out), "--budget", str(limit - 10)]
        if smoke:
            cmd.append("--cpu-smoke")
        t0 = time.monotonic()
        print(f"== {name} (limit {limit:.0f} s)", flush=True)
        with open(out / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=stage_env,
                                    timeout=limit, cwd=REPO).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        seconds = round(time.monotonic() - t0, 1)
        tail = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
        summary["stages"][name] = {"exit": rc, "seconds": seconds,
                                   **({"last_lines": tail} if rc else {})}
        print(f"== {name}: exit {rc} after {seconds} s", flush=True)
        _write(out / "summary.json", summary)
    summary["seconds"] = round(time.monotonic() - start, 1)
    _write(out / "summary.json", summary)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=pathlib.Path, nargs="?")
    p.add_argument("--cpu-smoke", action="store_true", help="every stage at toy size on CPU")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("child_out", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=float(os.environ.get("KIT_BUDGET_S", 540)))
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--attention", help=argparse.SUPPRESS)
    p.add_argument("--unroll", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        out = pathlib.Path(a.child_out or a.out)
        if a.child == "sweep":
            stage_sweep(out, a.cpu_smoke, a.budget)
        elif a.child == "sweep_one":
            stage_sweep_one(out, a.cpu_smoke, a)
        else:
            globals()[f"stage_{a.child}"](out, a.cpu_smoke)
        return
    if a.out is None:
        p.error("OUTDIR is required")
    wanted = os.environ.get("STAGES", "").split() or list(ORDER)
    unknown = sorted(set(wanted) - set(ORDER))
    if unknown:
        p.error(f"unknown stages {unknown}; the stages are {list(ORDER)}")
    summary = run_all(a.out, a.cpu_smoke, [s for s in ORDER if s in wanted], a.budget)
    failed = [n for n, s in summary["stages"].items() if s["exit"]]
    print(f"accelerator kit: {len(summary['stages']) - len(failed)} of "
          f"{len(summary['stages'])} stages passed in {summary['seconds']} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
