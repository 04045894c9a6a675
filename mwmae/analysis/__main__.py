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
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

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
    report = analyse(w, clips, parts, batch=min(a.batch, len(clips)), seed=a.seed,
                     clip_names=names, log=print)
    report["seconds"] = round(time.perf_counter() - started, 2)
    (out / "analysis.json").write_text(json.dumps(report, indent=1))
    written = [out / "analysis.json", *figures.write_figures(report, out)]
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


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = cli.parse_args(p, argv)
    if a.step is not None and not a.workdir:
        p.error("--step applies to --workdir")
    if a.clips < 1 or a.batch < 1:
        p.error("--clips and --batch must be at least 1")
    try:
        run(a)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
