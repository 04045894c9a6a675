"""The files of one shard set, by name: what the builder writes beside its shards and every
reader finds there (local paths or gs:// alike).

    OUT/PREFIX-manifest.csv      shard,num_records: the set, what training names
    OUT/PREFIX-labels.csv        index,label: the class vocabulary (labelled sources)
    OUT/PREFIX-clip-labels.csv   shard,record,labels: every record's label ids
    OUT/PREFIX-rejects.csv       path,reason: clips left out
    OUT/PREFIX-build.json        the build these files belong to

    python -m mwmae.data.shard_set manifest OUT PREFIX     # prints OUT/PREFIX-manifest.csv
"""

from __future__ import annotations

import dataclasses
import sys

from mwmae.data import storage

# The one place these suffixes are spelled.
SUFFIXES = {
    "manifest": "-manifest.csv",
    "labels": "-labels.csv",
    "clip_labels": "-clip-labels.csv",
    "rejects": "-rejects.csv",
    "build_record": "-build.json",
}


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The shard set written to ``folder`` under ``prefix``."""

    folder: str
    prefix: str

    @classmethod
    def from_manifest(cls, path: str) -> ShardSet:
        """The set whose manifest is ``path``; a ValueError for a path that is not one."""
        path = str(path)
        if not cls.is_manifest(path):
            raise ValueError(f"{path}: not a shard set's manifest (PREFIX{SUFFIXES['manifest']})")
        folder, _, name = path.rpartition("/")
        return cls(folder, name[: -len(SUFFIXES["manifest"])])

    @staticmethod
    def is_manifest(path: object) -> bool:
        return isinstance(path, str) and path.endswith(SUFFIXES["manifest"])

    def name(self, kind: str) -> str:
        """The file name (no folder) of ``kind``: a key of :data:`SUFFIXES`."""
        return self.prefix + SUFFIXES[kind]

    def path(self, kind: str) -> str:
        return storage.join(self.folder, self.name(kind)) if self.folder else self.name(kind)

    # The set's files by name: ``ShardSet(out, "train").labels`` is OUT/train-labels.csv.
    manifest = property(lambda self: self.path("manifest"))
    labels = property(lambda self: self.path("labels"))
    clip_labels = property(lambda self: self.path("clip_labels"))
    rejects = property(lambda self: self.path("rejects"))
    build_record = property(lambda self: self.path("build_record"))

    def names(self) -> dict[str, str]:
        """{kind: file name} of every file of the set but its shards."""
        return {kind: self.name(kind) for kind in SUFFIXES}


def main(argv: list[str] | None = None) -> int:
    """``python -m mwmae.data.shard_set KIND FOLDER PREFIX``: print that file's path (for
    scripts, which then never spell the names themselves)."""
    import argparse

    from mwmae import cli

    p = argparse.ArgumentParser(prog="python -m mwmae.data.shard_set",
                                description="Print the path of one file of a shard set.")
    p.add_argument("kind", choices=list(SUFFIXES), help="which file")
    p.add_argument("folder", help="the folder the builder wrote (--out), local or gs://")
    p.add_argument("prefix", help="the builder's --prefix (default data)")
    a = cli.parse_args(p, argv)
    print(ShardSet(a.folder, a.prefix).path(a.kind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
