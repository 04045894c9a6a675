"""Check shards: ``python -m tfrecord_tools.inspect SHARD_OR_GLOB_OR_MANIFEST...``.

Parses every record of every shard (local or gs://) and prints JSON: records per shard, the
frame-count range, the mel-bin count, a label histogram, and every problem found (a file that
is missing, truncated or corrupt, a record outside the schema). Exit status 1 when any; 2 for
bad flags (one line ``error: ...``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from mwmae import cli
from mwmae.data import records, shards


def inspect_shards(sources: Sequence[str], *, compression: str | None = "zlib",
                   top_labels: int = 20) -> dict:
    per_shard = []
    problems: list[str] = []
    labels: collections.Counter[int] = collections.Counter()
    frames: list[int] = []
    mels: set[int] = set()
    unlabelled = 0
    listed: list[shards.Shard] = []
    for source in sources:
        if os.path.isdir(source):
            problems.append(f"{source}: a folder; give its PREFIX-manifest.csv or a glob of its "
                            "shards")
            continue
        try:
            listed.extend(shards.resolve(source))
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    for shard in listed:
        count = 0
        try:
            for index, raw in enumerate(shards.iter_records(shard, compression=compression)):
                try:
                    audio, ids = records.decode_example(raw)
                except records.RecordError as e:
                    problems.append(f"{shard.path}: record {index}: {e}")
                    continue
                count += 1
                frames.append(audio.shape[0])
                mels.add(audio.shape[1])
                if not np.all(np.isfinite(audio)):
                    problems.append(f"{shard.path}: record {index}: non-finite values")
                labels.update(int(i) for i in ids)
                unlabelled += ids.size == 0
        except (records.RecordError, OSError) as e:
            problems.append(str(e))
        if shard.num_records is not None and shard.num_records != count:
            problems.append(f"{shard.path}: manifest says {shard.num_records} records, "
                            f"parsed {count}")
        per_shard.append({"shard": shard.path, "records": count})
    return {
        "shards": len(per_shard),
        "records": sum(s["records"] for s in per_shard),
        "per_shard": per_shard,
        "frames": {"min": min(frames), "max": max(frames), "mean": float(np.mean(frames))}
        if frames else None,
        "mel_bins": sorted(mels),
        "distinct_labels": len(labels),
        "unlabelled_records": unlabelled,
        "label_histogram": dict(labels.most_common(top_labels)),
        "problems": problems,
        "ok": not problems,
    }


class _UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints its usage block and exits; a refusal here is one line, printed last.
        raise _UsageError(f"{message} (see --help)")


def _top_labels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: no histogram), got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m tfrecord_tools.inspect", description=__doc__)
    p.add_argument("shards", nargs="+", help="shard paths, globs or a manifest CSV")
    p.add_argument("--compression", choices=("zlib", "none"), default="zlib")
    p.add_argument("--top-labels", type=_top_labels, default=20,
                   help="labels in the histogram, most frequent first")
    try:
        args = cli.parse_args(p, argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    report = inspect_shards(args.shards,
                            compression=None if args.compression == "none" else "zlib",
                            top_labels=args.top_labels)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
