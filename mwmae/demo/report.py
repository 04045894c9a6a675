"""The demo's last stage: a summary table in the terminal and a picture of what the model learnt.

    python -m mwmae.demo.report WORKDIR

Reads what the earlier stages of ``scripts/demo.sh`` left in WORKDIR (``timings.tsv``,
``corpus/``, ``shards/``, ``train/``, ``hear/{pretrained,initial}/results.json``,
``finetune/<mode>-<seed>/evaluations.jsonl``) and writes

* ``WORKDIR/summary.md`` and ``summary.json``: per stage its time and result, the downstream
  score of the pretrained model against the same network before training (HEAR's probe), and
  the fine-tuned, initial-weights and frozen-probe taggers' test scores (mean ± std over seeds);
* ``WORKDIR/demo.png``: input log-mel spectrograms of a few corpus clips, the masked input the
  encoder saw (80% of the patches removed) and the reconstruction, the loss curve, and the
  downstream scores.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
from typing import Any

import numpy as np

from mwmae import cli
from mwmae.artifact import CONFIG_FILE as ARTIFACT_CONFIG
from mwmae.data.shard_set import ShardSet
from mwmae.workdir import Workdir

STAGES = ("corpus", "shards", "train", "export", "validate", "tasks", "evaluate", "finetune",
          "report")
# The finetune stage's runs, as scripts/demo.sh names their workdirs (MODE-SEED).
TAG_MODES = {"finetuned": "fine-tuned", "initial": "initial weights, fine-tuned",
             "probe": "frozen-encoder probe"}


def read_timings(workdir: pathlib.Path) -> dict[str, dict[str, str]]:
    """The last recorded run of each stage: {stage: {"seconds", "status"}}."""
    path = workdir / "timings.tsv"
    out: dict[str, dict[str, str]] = {}
    if path.exists():
        for row in csv.reader(path.read_text().splitlines(), delimiter="\t"):
            if len(row) == 3:
                out[row[0]] = {"seconds": row[1], "status": row[2]}
    return out


def loss_curve(tensorboard_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) logged by the trainer, in step order."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(tensorboard_dir),
                                             size_guidance={event_accumulator.TENSORS: 0,
                                                            event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()
    # "train/loss" since the tags were grouped; "loss" in workdirs written before.
    tag = next((t for t in ("train/loss", "loss")
                if t in tags.get("tensors", []) + tags.get("scalars", [])), None)
    if tag is None:
        raise FileNotFoundError(f"{tensorboard_dir}: no loss in the TensorBoard logs")
    if tag in tags.get("tensors", []):
        events = [(e.step, float(np.asarray(_tensor_value(e.tensor_proto))))
                  for e in acc.Tensors(tag)]
    else:
        events = [(e.step, e.value) for e in acc.Scalars(tag)]
    by_step = dict(sorted(events))  # a resumed run may log a step twice: keep the last
    steps = np.asarray(sorted(by_step))
    return steps, np.asarray([by_step[s] for s in steps])


def _tensor_value(proto: Any) -> np.ndarray:
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(proto)


def shard_summary(manifest: pathlib.Path) -> dict[str, int]:
    """Shards and records, counted by reading every shard through (they must all parse)."""
    from mwmae.data import shards

    listed = shards.resolve(str(manifest))
    return {"shards": len(listed), "records": sum(shards.count_records(s) for s in listed)}


def reconstructions(workdir: pathlib.Path, clips: list[pathlib.Path]) -> np.ndarray:
    """(N, F, 3T + gaps) panels: input, masked input, reconstruction (the latest checkpoint)."""
    import jax
    import soundfile as sf

    import mwmae
    from mwmae import audio
    from mwmae.train.images import reconstruction_grid

    model = mwmae.load(workdir / "train")
    frames = model.config.input_shape[0]
    batch = []
    for path in clips:
        wave, _ = sf.read(str(path), dtype="float32")
        mel = audio.log_mel_spectrogram_numpy(wave)[:frames]
        batch.append(audio.normalize_for_pretraining(mel))
    x = np.stack(batch)[..., None]
    rec = model.reconstruct(x, rng=jax.random.key(0))
    return reconstruction_grid(x, np.asarray(rec.pred), np.asarray(rec.mask),
                               model.config.patch_size)[..., 0]


def downstream(workdir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """{model: {task: {"metric", "mean", "std", "scores"}}} from the evaluation results."""
    out = {}
    for name in ("pretrained", "initial"):
        path = workdir / "hear" / name / "results.json"
        if path.exists():
            out[name] = json.loads(path.read_text())["tasks"]
    return out


def overall_scores(workdir: pathlib.Path) -> dict[str, float]:
    """{model: overall score} of the pretrained model's comparison with the initial weights."""
    path = workdir / "hear" / "pretrained" / "results.json"
    return json.loads(path.read_text()).get("overall_score", {}) if path.exists() else {}


def _ci(summary: dict[str, Any]) -> str:
    ci = summary.get("ci95", float("nan"))
    return "n/a" if ci != ci else f"{ci:.3f}"


def finetuning(workdir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """{mode: {"metric", "mean", "std", "n", "scores", "seeds"}} from the taggers' last
    evaluations (the test split, at their final step)."""
    out: dict[str, dict[str, Any]] = {}
    for mode in TAG_MODES:
        runs = []
        for wd in sorted((workdir / "finetune").glob(f"{mode}-*")):
            rows = Workdir(wd).read_evaluations()
            if rows and wd.name.rsplit("-", 1)[1].isdigit():
                runs.append((int(wd.name.rsplit("-", 1)[1]), rows[-1]))
        if runs:
            metric = "top1" if "top1" in runs[0][1] else "mAP"
            scores = [r[metric] for _, r in sorted(runs)]
            out[mode] = {"metric": metric, "mean": float(np.mean(scores)),
                         "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
                         "n": len(scores), "scores": scores, "seeds": sorted(s for s, _ in runs),
                         "step": int(runs[0][1]["step"])}
    return out


def make_figure(path: pathlib.Path, panels: np.ndarray, names: list[str], steps: np.ndarray,
                losses: np.ndarray, bars: dict[str, tuple[float, float]] | None = None) -> None:
    """The reconstructions, the loss curve and, with ``bars`` ({label: (mean, std)}), the
    downstream scores beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig = plt.figure(figsize=(10, 1.9 * n + 2.8))
    grid = fig.add_gridspec(n + 1, 2, height_ratios=[1] * n + [1.5],
                            width_ratios=[1.4, 1] if bars else [1, 0.001])
    for i, (img, name) in enumerate(zip(panels, names)):
        ax = fig.add_subplot(grid[i, :])
        ax.imshow(img, origin="upper", aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"{name}: input | masked input (80% of patches removed) | reconstruction",
                     fontsize=9)
        ax.set_yticks([])
        ax.set_xticks([])
    ax = fig.add_subplot(grid[n, 0] if bars else grid[n, :])
    ax.plot(steps, losses, color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (masked patches, MSE)")
    ax.grid(alpha=0.3)
    if bars:
        ax = fig.add_subplot(grid[n, 1])
        labels = list(bars)
        ax.barh(range(len(labels)), [bars[k][0] for k in labels],
                xerr=[bars[k][1] for k in labels], color="tab:orange", alpha=0.8, capsize=3)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("digits top-1 (test; mean ± std over seeds)", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_seconds(s: str) -> str:
    try:
        v = float(s)
    except ValueError:
        return s
    return f"{v:.0f} s" if v >= 10 else f"{v:.1f} s"


def report(workdir: str | pathlib.Path) -> dict[str, Any]:
    """Write summary.md, summary.json and demo.png; returns the summary."""
    workdir = pathlib.Path(workdir)
    timings = read_timings(workdir)
    corpus = {kind.name: len(list(kind.glob("*.wav")))
              for kind in sorted((workdir / "corpus").iterdir()) if kind.is_dir()}
    shard_info = shard_summary(pathlib.Path(ShardSet(str(workdir / "shards"), "data").manifest))
    train_dir = Workdir(workdir / "train")
    steps, losses = loss_curve(pathlib.Path(str(train_dir.tensorboard)))
    checkpoints = train_dir.steps()
    artifact = json.loads((workdir / "export" / ARTIFACT_CONFIG).read_text())
    scores = downstream(workdir)
    tagged = finetuning(workdir)

    clips = [sorted((workdir / "corpus" / kind).glob("*.wav"))[0] for kind in corpus]
    panels = reconstructions(workdir, clips)
    png = workdir / "demo.png"
    bars = {f"HEAR probe, {m}": (r["mean"], r["std"]) for m, r in
            ((m, scores.get(m, {}).get("mwmae_digits")) for m in ("pretrained", "initial")) if r}
    bars.update({TAG_MODES[m]: (r["mean"], r["std"]) for m, r in tagged.items()})
    make_figure(png, panels, list(corpus), steps, losses, bars)

    results = {
        "corpus": ", ".join(f"{v} {k}" for k, v in corpus.items()) + " clips",
        "shards": f"{shard_info['shards']} shards, {shard_info['records']} records, all readable",
        "train": (f"{int(steps[-1])} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
                  f"checkpoints {checkpoints}"),
        "export": f"{artifact['num_params']:,} encoder parameters, embedding size "
                  f"{artifact['embedding_size']}",
        "validate": timings.get("validate", {}).get("status", "?"),
    }
    task_lines = []
    for task, pre in scores.get("pretrained", {}).items():
        init = scores.get("initial", {}).get(task)
        line = f"{task}: {pre['metric']} {pre['mean']:.3f} ± {_ci(pre)} pretrained"
        if init:
            line += f" vs {init['mean']:.3f} ± {_ci(init)} initial weights"
        task_lines.append(line + f" (mean ± 95% interval over {pre['n']} seeds)")
    overall = overall_scores(workdir)
    if overall:
        task_lines.append("overall score " + " vs ".join(
            f"{v:.1f} {k}" for k, v in overall.items()))
    results["evaluate"] = "; ".join(task_lines) or "no results"
    results["finetune"] = "; ".join(
        f"{TAG_MODES[m]} {r['mean']:.3f} ± {r['std']:.3f}" for m, r in tagged.items()) + (
        f" (digits {next(iter(tagged.values()))['metric']} on the test split after "
        f"{next(iter(tagged.values()))['step']} steps, {next(iter(tagged.values()))['n']} "
        "seeds)" if tagged else "no runs")
    results["report"] = f"{png} ({png.stat().st_size:,} bytes)"

    rows = [(stage, _fmt_seconds(timings.get(stage, {}).get("seconds", "")), results.get(
        stage, timings.get(stage, {}).get("status", ""))) for stage in STAGES]
    width = max(len(r[0]) for r in rows)
    table = [f"| {'stage':<{width}} | time   | result |",
             f"|{'-' * (width + 2)}|--------|--------|"]
    table += [f"| {s:<{width}} | {t:>6} | {r} |" for s, t, r in rows]
    total = sum(float(v["seconds"]) for k, v in timings.items()
                if k in STAGES and v["seconds"].replace(".", "", 1).isdigit())
    summary = {
        "stages": {s: {"seconds": timings.get(s, {}).get("seconds"), "result": r}
                   for s, _, r in rows},
        "total_seconds": total,
        "loss_first": float(losses[0]), "loss_final": float(losses[-1]),
        "final_step": int(steps[-1]), "checkpoints": checkpoints,
        "downstream": scores, "finetune": tagged, "shards": shard_info, "corpus": corpus,
        "png": str(png),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    text = "\n".join(table) + f"\n\ntotal: {total:.0f} s\n"
    (workdir / "summary.md").write_text(text)
    print(text)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.demo.report",
                                description=__doc__.split("\n")[0])
    p.add_argument("workdir")
    a = cli.parse_args(p, argv)
    try:
        report(a.workdir)
    except FileNotFoundError as e:
        print(f"error: {e} (run the earlier stages of scripts/demo.sh first)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
