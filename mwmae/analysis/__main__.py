"""Attention analysis of a trained MW-MAE / MAE: distances, entropies and head similarity.

    python -m mwmae.analysis --artifact DIR --shards MANIFEST_OR_GLOB --out OUT
    python -m mwmae.analysis --workdir DIR [--step N] --shards ... --out OUT
        [--clips 64] [--batch 8] [--part encoder|decoder|both] [--seed 0]

Reads the first ``--clips`` clips of the shards (centre crop, normalised as in evaluation),
runs the encoder on whole inputs and the decoder in the pretraining forward (the config's mask
ratio, masks drawn from ``--seed``) with the attention captured, and writes
``OUT/analysis.json`` (per part, layer and head: window size, mean attention distance in
patches, along time in ms and along frequency in mel bins and Hz, entropy in nats, the same for
uniform attention over the window; the CKA matrix of the heads' outputs with each row's layer,
head and window) and the figures ``OUT/distance.png``, ``OUT/entropy.png``,
``OUT/cka_<part>.png``. The decoder needs its weights: a pretraining workdir has both; with no
``--part``, an encoder-only artifact (the default export) analyses its encoder and says so, and
asking for its decoder (``--part decoder|both``) is an error. Bad input is one line on stderr and
exit status 2.

``--out`` may not lie inside the artifact or workdir it reads. A rerun into the same ``--out``
replaces the analysis' own files whole (a figure of a part it did not analyse is removed; other
files are left alone), and one analysis at a time writes there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from mwmae import cli
from mwmae.analysis.errors import AnalysisError

PARTS = {"encoder": ("encoder",), "decoder": ("decoder",), "both": ("encoder", "decoder")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mwmae.analysis",
                                description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="exported artifact (or original-format checkpoint) "
                                        "directory")
    src.add_argument("--workdir", help="training workdir (local or gs://)")
    p.add_argument("--step", type=int, default=None,
                   help="--workdir only: checkpoint step (default: latest)")
    p.add_argument("--shards", required=True,
                   help="log-mel shards: a manifest CSV, a glob or a path")
    p.add_argument("--out", required=True, help="folder for analysis.json and the figures")
    p.add_argument("--clips", type=int, default=64, help="clips to analyse (default 64)")
    p.add_argument("--batch", type=int, default=8, help="clips per forward pass (default 8)")
    p.add_argument("--part", choices=sorted(PARTS), default=None,
                   help="which stack to analyse (default: both when the weights have a "
                        "decoder, else the encoder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoder pass's masks")
    return p


def run(a: argparse.Namespace) -> dict:
    from mwmae.analysis import figures, inputs, weights
    from mwmae.analysis.analyse import analyse

    figures.require_matplotlib()  # before minutes of work, not after
    started = time.perf_counter()
    w = (weights.from_artifact(a.artifact) if a.artifact
         else weights.from_workdir(a.workdir, a.step))
    if a.part is None and not w.has_decoder:
        print("note: these weights have no decoder; analysing the encoder (a pretraining "
              "workdir, --workdir, has both)")
    parts = PARTS[a.part or ("both" if w.has_decoder else "encoder")]
    if "decoder" in parts and not w.has_decoder:
        raise AnalysisError(w.no_decoder)
    frames, n_mels = w.config.img_size
    clips, names = inputs.read_clips(a.shards, a.clips, frames=frames, n_mels=n_mels)
    if len(clips) < a.clips:
        print(f"note: the shards hold {len(clips)} clips; analysing those")
    out = pathlib.Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"--out {out}: cannot create the folder ({e})") from e
    with _only_writer(out):
        report = analyse(w, clips, parts, batch=min(a.batch, len(clips)), seed=a.seed,
                         clip_names=names, log=print)
        report["seconds"] = round(time.perf_counter() - started, 2)
        written = _write_outputs(report, out, figures)
    for name, part in report["parts"].items():
        for layer in part["layers"]:
            cells = ", ".join(f"{h['window_label']} {h['distance_patches']:.2f}p "
                              f"{h['entropy_nats']:.2f}n" for h in layer["heads"])
            print(f"{name} layer {layer['layer']}: {cells}")
        s = part["cka"]["summary"]
        print(f"{name} CKA across layers: same window {s['same_window_other_layer']}, other "
              f"windows {s['other_window_other_layer']}")
    print(f"wrote {', '.join(str(p) for p in written)} ({len(clips)} clips, "
          f"{time.perf_counter() - started:.1f} s)")
    return report


LOCK = ".analysis-lock"  # in --out, held while an analysis writes there


@contextlib.contextmanager
def _only_writer(out: pathlib.Path) -> Iterator[None]:
    """One analysis at a time per --out: two would leave one's report beside the other's
    figures. The lock goes with the process, however it ends."""
    import fcntl

    with open(out / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise AnalysisError(f"--out {out}: another analysis is writing there now; wait for "
                                "it or give another folder") from e
        yield


def _write_outputs(report: dict, out: pathlib.Path, figures: Any) -> list[pathlib.Path]:
    """The report and figures, each written whole under a temporary name and renamed into
    place; a figure of a part this run did not analyse (an earlier run's) is removed, so the
    folder never shows figures that disagree with analysis.json."""
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".analysis-", dir=out))
    try:
        (staging / "analysis.json").write_text(json.dumps(report, indent=1))
        made = [staging / "analysis.json", *figures.write_figures(report, staging)]
        written = [out / p.name for p in made]
        for p in made:
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for part in PARTS["both"]:
        stale = out / f"cka_{part}.png"
        if stale not in written:
            stale.unlink(missing_ok=True)
    return written


def _inside(out: str, source: str) -> bool:
    if "://" in out or "://" in source:
        return False
    a, b = pathlib.Path(out).resolve(), pathlib.Path(source).resolve()
    return a == b or b in a.parents


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = cli.parse_args(p, argv)
    if a.step is not None and not a.workdir:
        p.error("--step applies to --workdir")
    if a.clips < 1 or a.batch < 1:
        p.error("--clips and --batch must be at least 1")
    if not -2**63 <= a.seed < 2**63:  # the masks' random key is a 64-bit integer
        p.error(f"--seed {a.seed}: must lie in [-2**63, 2**63)")
    for flag, source in (("--artifact", a.artifact), ("--workdir", a.workdir)):
        if source and _inside(a.out, source):
            print(f"error: --out {a.out} is inside {flag} {source}: the analysis would write "
                  "into what it reads; give another folder", file=sys.stderr)
            return 2
    try:
        run(a)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
