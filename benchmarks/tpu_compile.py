"""The TPU compile table: the base config's train step compiled for TPU slices, no TPU needed.

  scripts/install.sh .venv-tpu test,tpu
  .venv-tpu/bin/python benchmarks/tpu_compile.py --out benchmarks/results/tpu-compile
  .venv-tpu/bin/python benchmarks/tpu_compile.py --rows v5p-8 --attention auto   # one row
  .venv-tpu/bin/python benchmarks/tpu_compile.py --rows v4-8 -- --config.grad_accum_steps=2
  .venv-tpu/bin/python benchmarks/tpu_compile.py --rows "2x v5e-4 (dcn data)"  # two slices
  .venv-tpu/bin/python benchmarks/tpu_compile.py --table benchmarks/results/tpu-compile/rows.jsonl

Each row runs ``python -m mwmae.train.compile_check`` in its own process (a compile of the base
model takes minutes and GiBs of host memory) with the paper's global batch 1024 and prints one
JSON line; the table (markdown) and every report (JSON) are written to ``--out``. "Fits" compares
XLA's per-device peak estimate with the device's HBM (a chip's HBM over the devices libtpu lists
per chip). Nothing here measures speed: no TPU runs anything. Multi-slice rows ("2x ...") are
compiled for two slices joined over the data-centre network; each report says which mesh axes
cross slices and which collectives go between them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/mwmae_base_200_4x16.py"

# name: (topology of one slice, mesh preset, HBM per chip in GiB, chips in all, slices).
# Multi-slice rows join the slices over the data-centre network; the preset describes one
# slice and the data axis spans them (compile_check --num_slices).
SLICES = {
    "v4-8": ("v4:2x2x1", "dp", 32, 4, 1),
    "v5e-8": ("v5e:2x4", "dp", 16, 8, 1),
    "v5p-8": ("v5p:2x2x1", "dp", 95, 4, 1),
    "v6e-8": ("v6e:2x4", "dp", 32, 8, 1),
    "v5p-16 (data)": ("v5p:2x2x2", "dp", 95, 8, 1),
    "v4-32 (fsdp)": ("v4:2x2x4", "fsdp", 32, 16, 1),
    "v6e-16 (fsdp_tp)": ("v6e:4x4", "fsdp_tp", 32, 16, 1),
    "2x v5e-4 (dcn data)": ("v5e:2x2", "dp", 16, 8, 2),
    "2x v5e-4 (dcn data, fsdp)": ("v5e:2x2", "fsdp", 16, 8, 2),
    "2x v5p-8 (dcn data)": ("v5p:2x2x1", "dp", 95, 8, 2),
}


def run_row(name: str, attention: str, batch: int, extra: list[str], timeout: int) -> dict:
    topology, preset, hbm_per_chip, chips, slices = SLICES[name]
    cmd = [sys.executable, "-m", "mwmae.train.compile_check", "--config", CONFIG,
           "--topology", topology, f"--config.mesh.preset={preset}",
           f"--config.batch_size={batch}", f"--config.model.attention_impl={attention}", *extra]
    if slices > 1:
        cmd += ["--num_slices", str(slices)]
    row = {"slice": name, "topology": topology, "preset": preset, "attention_impl": attention,
           "command": " ".join(cmd[1:])}
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TPU_SKIP_MDS_QUERY": "1"})
    except subprocess.TimeoutExpired:
        return {**row, "error": f"compile did not finish in {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**row, "error": err[:300]}
    report = json.loads(lines[-1])
    hbm_gib = hbm_per_chip * chips / report["devices"]
    peak_gib = report.get("peak_estimate_mib", float("nan")) / 1024
    return {**row, **report, "hbm_per_device_gib": hbm_gib, "fits": peak_gib <= hbm_gib}


def table(rows: list[dict]) -> str:
    """Markdown, one line per compile."""
    out = ["| slice | topology | mesh | attention | devices | batch/device | microbatches | "
           "compile s | peak GiB/device (estimate) | HBM GiB/device | fits |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['slice']} | {r['topology']} | {r['preset']} | "
                       f"{r['attention_impl']} | | | | | | | error: {r['error']} |")
            continue
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        out.append(
            f"| {r['slice']} | {r['topology']} | {mesh} | {r['attention']} | {r['devices']} | "
            f"{r['batch_size'] // r['devices']} | {r['grad_accum_steps']} | "
            f"{r['compile_seconds']:.0f} | "
            f"{r['peak_estimate_mib'] / 1024:.1f} | {r['hbm_per_device_gib']:.0f} | "
            f"{'yes' if r['fits'] else 'no'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(SLICES), choices=list(SLICES))
    p.add_argument("--attention", nargs="+", default=["auto", "xla"])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--table", type=pathlib.Path, help="only print the table of a rows.jsonl")
    p.add_argument("extra", nargs="*", help="more --config.x=y overrides for every row")
    args = p.parse_args(argv)
    if args.table:
        print(table([json.loads(ln) for ln in args.table.read_text().splitlines() if ln]))
        return
    rows = []
    for name in args.rows:
        for attention in args.attention:
            row = run_row(name, attention, args.batch, args.extra, args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "rows.jsonl").open("a").write(json.dumps(row) + "\n")
    print(table(rows))
    if args.out:
        (args.out / "table.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
