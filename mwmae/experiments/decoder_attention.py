"""The paper's central claim, small: MW-MAE's multi-window decoder against MAE's global one at
equal steps (MW-MAE then does fewer FLOPs), with intervals over pretraining seeds.

    python -m mwmae.experiments.decoder_attention --out runs/decoder-attention \\
        [--steps 2000] [--seeds 3] [--predictor-seeds 10] [--smoke]

Both arms are the demo's model (``configs/demo.py``: a 64-wide, 2-layer encoder with 4 global
heads; a 64-wide, 2-layer decoder with 4 heads), pretrained on the demo's corpus (spoken words,
tones, noise) for the same steps, batch and seeds. They differ only in the decoder's windows:

* ``mwmae``: [5, 25, 0, 0], the paper's local-global scheme scaled to the demo's 50 x 5 patch
  grid (windows of one and five time frames beside two global heads);
* ``mae``: all heads global.

A windowed head attends within blocks of ``w`` tokens, so at equal steps MW-MAE does fewer FLOPs
(16% per example by ``mwmae.train.perf``'s count): equal steps do not favour it.
Each pretrained encoder is exported and scored by hear-eval-kit's probe on two tasks with
``--predictor-seeds`` seeds: spoken digits (held-out speakers) and note pitch (held-out
timbres: ``mwmae.hear.tasks --kind notes``). A seed's score is the mean over its predictor seeds;
per task and arm the table gives the mean and 95% t-interval over pretraining seeds, and the
difference MW-MAE - MAE with its Welch interval and p-value. One pretrained model per arm is also
analysed (``mwmae.analysis``): mean attention distance and entropy of every decoder head.

Everything lands in ``--out`` (corpus, shards, tasks, one folder per run, ``results.json``,
``results.md``); a rerun reuses what is finished (training resumes from its checkpoints, the
evaluation from its finished seeds) and refuses another ``--steps``/corpus into the same folder.
``--smoke`` is the same pipeline at toy size (a few steps, 1 seed per arm, 1 predictor seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from mwmae import cli
from mwmae.data.shard_set import ShardSet

ARMS = {"mwmae": "(5,25,0,0)", "mae": "(0,0,0,0)"}
TASKS = ("digits", "notes")
TASK_NAMES = {"digits": "mwmae_digits", "notes": "mwmae_notes"}


class ExperimentError(RuntimeError):
    """A stage that failed or settings this folder refuses; the message says which."""


def settings(a: argparse.Namespace) -> dict[str, Any]:
    """What the results depend on: a rerun with other values needs another ``--out``."""
    if a.smoke:
        return {"steps": 30, "seeds": 1, "predictor_seeds": 1, "clips": 160, "task_clips": 10,
                "devices": a.devices, "smoke": True}
    return {"steps": a.steps, "seeds": a.seeds, "predictor_seeds": a.predictor_seeds,
            "clips": a.clips, "task_clips": a.task_clips, "devices": a.devices, "smoke": False}


class Runner:
    """Runs one stage's command once, timing it; a failure names the stage and its log."""

    def __init__(self, out: pathlib.Path, devices: int, log: Callable[[str], None]):
        self.out, self.log = out, log
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore",
                    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                                 + os.environ.get("XLA_FLAGS", "")}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, args: Sequence[str]) -> None:
        log_path = self.out / "logs" / f"{name}.log"
        start = time.perf_counter()
        with open(log_path, "w") as f:
            rc = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT,
                                env=self.env).returncode
        if rc:
            tail = log_path.read_text().strip().splitlines()[-1:] or [""]
            raise ExperimentError(f"stage {name} failed (exit {rc}; log {log_path}): {tail[0]}")
        self.log(f"  {name}: done in {time.perf_counter() - start:.0f} s")


def run(out: pathlib.Path, s: dict[str, Any], log: Callable[[str], None] = print
        ) -> dict[str, Any]:
    """Every stage, reusing what is finished; returns the results (also written to ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "settings.json"
    if recorded.exists() and json.loads(recorded.read_text()) != s:
        raise ExperimentError(f"{recorded}: this folder holds an experiment with other settings "
                              f"({json.loads(recorded.read_text())}); give another --out")
    recorded.write_text(json.dumps(s, indent=1))
    runner = Runner(out, s["devices"], log)
    shards = ShardSet(str(out / "shards"), "data")
    runs = [(arm, seed) for seed in range(1, s["seeds"] + 1) for arm in ARMS]
    stages = 2 + 3 * len(runs) + len(ARMS)
    done = 0

    def stage(what: str) -> None:
        nonlocal done
        done += 1
        log(f"[{done}/{stages}] {what}")

    stage("corpus and shards")
    if not pathlib.Path(shards.manifest).exists():
        runner("corpus", ["-m", "mwmae.demo.corpus", str(out / "corpus"), "--clips",
                          str(s["clips"])])
        runner("shards", ["-m", "tfrecord_tools.build", "folder", str(out / "corpus"), "--out",
                          str(out / "shards"), "--shard-size", "100", "--workers", "1",
                          "--no-progress"])
    stage("HEAR tasks")
    for task in TASKS:
        if (out / "tasks" / TASK_NAMES[task] / "task_metadata.json").exists():
            continue
        runner(f"task-{task}", ["-m", "mwmae.hear.tasks", str(out / "tasks"), "--kind", task,
                                "--per-class", str(s["task_clips"]), "--seed", "1"])
    for arm, seed in runs:
        wd = out / "runs" / f"{arm}-{seed}"
        # A stage's last output marks it finished: a rerun skips it (the trainer would resume
        # anyway, but its start and compile cost ~40 s per run).
        evaluated = (wd / "hear" / "results.json").exists()
        exported = evaluated or (wd / "export" / "model.safetensors").exists()
        stage(f"pretrain {arm} seed {seed} ({s['steps']} steps)" + " - done" * exported)
        if not exported:
            runner(f"train-{arm}-{seed}", [
                "-m", "mwmae.train", "--config", str(_repo_config()), "--workdir", str(wd),
                f"--config.data.train_shards={shards.manifest}",
                f"--config.num_train_steps={s['steps']}", f"--config.seed={seed}",
                f"--config.model.decoder_window_sizes={ARMS[arm]}",
                f"--config.steps_per_epoch={max(1, s['clips'] // 32)}",
                "--config.progress_bar=False", "--config.image_every_steps=0",
                f"--config.checkpoint.every_steps={max(1, s['steps'] // 4)}"])
        stage(f"export {arm} seed {seed}" + " - done" * exported)
        if not exported:
            runner(f"export-{arm}-{seed}", ["-m", "mwmae.export", "--workdir", str(wd), "--out",
                                            str(wd / "export"), "--overwrite"])
        stage(f"evaluate {arm} seed {seed} ({s['predictor_seeds']} predictor seeds)"
              + " - done" * evaluated)
        if not evaluated:
            runner(f"evaluate-{arm}-{seed}", [
                "-m", "mwmae.hear.evaluate", "--artifact", str(wd / "export"), "--tasks-dir",
                str(out / "tasks"), "--out", str(wd / "hear"), "--name", f"{arm}-{seed}",
                "--seeds", str(s["predictor_seeds"]), "--grid", "faster", "--grid-points", "1",
                "--overwrite"])
    for arm in ARMS:
        analysed = (out / "analysis" / arm / "analysis.json").exists()
        stage(f"attention analysis of {arm} seed 1" + " - done" * analysed)
        if not analysed:
            runner(f"analysis-{arm}", [
                "-m", "mwmae.analysis", "--workdir", str(out / "runs" / f"{arm}-1"), "--shards",
                shards.manifest, "--out", str(out / "analysis" / arm), "--part", "decoder",
                "--clips", "16" if s["smoke"] else "64"])
    results = collect(out, s)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    log(f"results: {out / 'results.md'}")
    return results


def _repo_config() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo.py"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> float:
    """Half-width of the Student-t interval of the mean; NaN for fewer than two values."""
    if len(values) < 2:
        return math.nan
    from scipy import stats

    return float(stats.t.ppf((1 + confidence) / 2, len(values) - 1)
                 * statistics.stdev(values) / math.sqrt(len(values)))


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean difference a - b, its 95% Welch interval half-width and the two-sided p-value."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {"difference": diff, "ci95": math.nan, "p_value": math.nan}
    from scipy import stats

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"difference": diff, "ci95": 0.0, "p_value": 0.0 if diff else 1.0}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {"difference": diff, "ci95": float(stats.t.ppf(0.975, df) * se),
            "p_value": float(2 * stats.t.sf(abs(diff) / se, df)), "df": df}


def collect(out: pathlib.Path, s: dict[str, Any]) -> dict[str, Any]:
    """Per task and arm: each pretraining seed's mean over its predictor seeds, then the mean
    and interval over seeds and the difference between the arms; the decoder heads' attention
    distance and entropy per arm."""
    per_seed: dict[str, dict[str, list[float]]] = {t: {arm: [] for arm in ARMS} for t in TASKS}
    for arm in ARMS:
        for seed in range(1, s["seeds"] + 1):
            result = json.loads((out / "runs" / f"{arm}-{seed}" / "hear" / "results.json")
                                .read_text())
            for task in TASKS:
                per_seed[task][arm].append(float(result["tasks"][TASK_NAMES[task]]["mean"]))
    tasks = {}
    for task in TASKS:
        arms = {arm: {"seeds": v, "mean": statistics.fmean(v), "ci95": t_interval(v)}
                for arm, v in per_seed[task].items()}
        test = welch(per_seed[task]["mwmae"], per_seed[task]["mae"])
        test["significant"] = bool(test["p_value"] < 0.05) if math.isfinite(
            test["p_value"]) else None
        tasks[task] = {"arms": arms, "mwmae_minus_mae": test}
    attention = {}
    for arm in ARMS:
        report = json.loads((out / "analysis" / arm / "analysis.json").read_text())
        attention[arm] = [{"layer": layer["layer"], "head": h["head"], "window": h["window"],
                           "distance_patches": h["distance_patches"],
                           "entropy_nats": h["entropy_nats"]}
                          for layer in report["parts"]["decoder"]["layers"]
                          for h in layer["heads"]]
    return {"settings": s, "arms": ARMS, "tasks": tasks, "attention": attention}


def _pm(mean: float, ci: float) -> str:
    return f"{mean:.3f} ± {ci:.3f}" if math.isfinite(ci) else f"{mean:.3f}"


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        "# MW-MAE against MAE: decoder attention at equal steps", "",
        f"{s['seeds']} pretraining seed(s) per arm, {s['steps']} steps, {s['clips']} corpus "
        f"clips; each seed scored with {s['predictor_seeds']} predictor seed(s). Mean ± 95% "
        "t-interval over pretraining seeds; the difference's interval is Welch's.", "",
        "| task | MW-MAE [5,25,0,0] | MAE (global) | MW-MAE - MAE | p | significant (5%) |",
        "|---|---|---|---|---|---|"]
    for task, t in r["tasks"].items():
        d = t["mwmae_minus_mae"]
        sig = {True: "yes", False: "no", None: "n/a"}[d["significant"]]
        p = f"{d['p_value']:.3f}" if math.isfinite(d["p_value"]) else "n/a"
        lines.append(f"| {task} | {_pm(t['arms']['mwmae']['mean'], t['arms']['mwmae']['ci95'])}"
                     f" | {_pm(t['arms']['mae']['mean'], t['arms']['mae']['ci95'])} | "
                     f"{d['difference']:+.3f}" + (f" ± {d['ci95']:.3f}" if math.isfinite(
                         d["ci95"]) else "") + f" | {p} | {sig} |")
    lines += ["", "Per seed:", ""]
    for task, t in r["tasks"].items():
        for arm, a in t["arms"].items():
            lines.append(f"- {task}, {arm}: " + ", ".join(f"{v:.3f}" for v in a["seeds"]))
    lines += ["", "## Decoder attention (seed 1 of each arm)", "",
              "Mean attention distance in patches and entropy in nats, per decoder head.", "",
              "| layer | head | MW-MAE window | distance | entropy | MAE window | distance | "
              "entropy |", "|---|---|---|---|---|---|---|---|"]
    for mw, ma in zip(r["attention"]["mwmae"], r["attention"]["mae"], strict=True):
        lines.append(f"| {mw['layer']} | {mw['head']} | {mw['window'] or 'global'} | "
                     f"{mw['distance_patches']:.2f} | {mw['entropy_nats']:.2f} | "
                     f"{ma['window'] or 'global'} | {ma['distance_patches']:.2f} | "
                     f"{ma['entropy_nats']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.experiments.decoder_attention",
                                description="MW-MAE against MAE at equal steps, with "
                                            "intervals over pretraining seeds")
    p.add_argument("--out", required=True, help="folder for everything the experiment makes")
    p.add_argument("--steps", type=int, default=2000, help="pretraining steps per run")
    p.add_argument("--seeds", type=int, default=3, help="pretraining seeds per arm")
    p.add_argument("--predictor-seeds", type=int, default=10,
                   help="hear-eval-kit predictor seeds per task and model")
    p.add_argument("--clips", type=int, default=1200, help="corpus clips")
    p.add_argument("--task-clips", type=int, default=60, help="clips per class of each task")
    p.add_argument("--devices", type=int, default=2, help="CPU devices the trainer sees")
    p.add_argument("--smoke", action="store_true",
                   help="toy size (a few steps, 1 seed, 1 predictor seed): checks the pipeline")
    a = cli.parse_args(p, argv)
    for flag, value, least in (("--steps", a.steps, 1), ("--seeds", a.seeds, 1),
                               ("--predictor-seeds", a.predictor_seeds, 1),
                               ("--clips", a.clips, 64), ("--task-clips", a.task_clips, 5),
                               ("--devices", a.devices, 1)):
        if value < least:
            print(f"error: {flag} {value}: expected at least {least}", file=sys.stderr)
            return 2
    if pathlib.Path(a.out).exists() and not pathlib.Path(a.out).is_dir():
        print(f"error: --out {a.out}: exists and is a file; give a folder", file=sys.stderr)
        return 2
    try:
        run(pathlib.Path(a.out), settings(a))
    except ExperimentError as e:
        sys.exit(f"error: {e}")  # the message last on stderr, exit status 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
