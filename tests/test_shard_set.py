"""The shard set's files have one owner: ShardSet names them, the builder writes exactly those,
and no other module or script spells their names."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from mwmae.data.shard_set import SUFFIXES, ShardSet, main
from tfrecord_tools import build as build_lib
from tfrecord_tools import sources

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_names_local_and_gs():
    s = ShardSet("/data/out", "train")
    assert s.manifest == "/data/out/train-manifest.csv"
    assert s.labels == "/data/out/train-labels.csv"
    assert s.clip_labels == "/data/out/train-clip-labels.csv"
    assert s.rejects == "/data/out/train-rejects.csv"
    assert s.build_record == "/data/out/train-build.json"
    remote = ShardSet.from_manifest("gs://bucket/sets/eval-manifest.csv")
    assert remote == ShardSet("gs://bucket/sets", "eval")
    assert remote.labels == "gs://bucket/sets/eval-labels.csv"
    assert ShardSet.from_manifest("data-manifest.csv").labels == "data-labels.csv"


def test_a_path_that_is_not_a_manifest_is_refused_naming_it():
    for bad in ("/data/out/train-00000-of-00001.tfrecord", "/data/out/*.tfrecord",
                "/data/out/train-labels.csv"):
        assert not ShardSet.is_manifest(bad)
        with pytest.raises(ValueError, match=re.escape(bad) + ": not a shard set's manifest"):
            ShardSet.from_manifest(bad)
    assert not ShardSet.is_manifest(["a-manifest.csv"])


def test_the_command_line_prints_a_path_for_scripts(capsys):
    assert main(["labels", "/x", "p"]) == 0 and capsys.readouterr().out == "/x/p-labels.csv\n"
    with pytest.raises(SystemExit) as bad:
        main(["nonsense", "/x", "p"])
    assert bad.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "mwmae.data.shard_set", "manifest", "/x", "p"],
                         capture_output=True, text=True, check=True).stdout
    assert out == "/x/p-manifest.csv\n"


def test_the_builder_writes_exactly_the_sets_files(tmp_path):
    audio = tmp_path / "audio"
    for label in ("a", "b"):
        (audio / label).mkdir(parents=True)
        t = np.arange(16000) / 16000
        soundfile.write(audio / label / "x.wav", 0.3 * np.sin(2 * np.pi * 300 * t), 16000)
    out = tmp_path / "out"
    listing = sources.from_folder(str(audio), labels_from_subfolder=True)
    summary = build_lib.build(listing, build_lib.BuildOptions(
        output=str(out), prefix="set", shard_size=1, workers=1, progress=False))
    files = ShardSet(str(out), "set")
    assert summary["manifest"] == files.manifest and summary["rejects_csv"] == files.rejects
    side = {p.name for p in out.iterdir() if p.is_file() and not p.name.endswith(".tfrecord")}
    assert side == set(files.names().values())


# Where the suffixes may still appear: their owner, and prose (docstrings, comments, messages
# that tell a user what the builder writes). Code that builds or cuts a name from them may not.
SPELLING = re.compile(r"""(["'])[^"'\n]*?(?<![A-Z])(""" + "|".join(
    re.escape(s) for s in SUFFIXES.values()) + r""")\1""")
SPELLED = re.compile("(?:" + "|".join(re.escape(s) for s in SUFFIXES.values()) + ")")


def spelled_names(text: str) -> list[str]:
    """Lines of code (not comments) with a string literal that is, ends with or cuts by a
    suffix, such as ``"-manifest.csv"`` or ``f"{prefix}-labels.csv"``; mentions after the
    placeholder PREFIX are prose."""
    found = []
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        if SPELLING.search(code) and "PREFIX" not in code:
            found.append(line.strip())
        elif re.search(r'\$\w*[}"]?' + SPELLED.pattern, code):  # shell: "$dir/data-manifest.csv"
            found.append(line.strip())
    return found


def test_the_check_finds_names_built_by_hand():
    assert spelled_names('path = train[: -len("-manifest.csv")] + "-labels.csv"')
    assert spelled_names('    f"{prefix}-build.json"')
    assert spelled_names('  --config.data.train_shards="$work/shards/data-manifest.csv"')
    assert not spelled_names('raise Error("give the builder\'s PREFIX-manifest.csv")')
    assert not spelled_names("# PREFIX-clip-labels.csv beside the manifest")


def test_no_module_or_script_spells_the_sets_file_names():
    owner = REPO / "mwmae" / "data" / "shard_set.py"
    files = [*REPO.glob("mwmae/**/*.py"), *REPO.glob("tfrecord_tools/**/*.py"),
             *REPO.glob("scripts/*.sh"), *REPO.glob("launch/*.sh"), *REPO.glob("configs/*.py"),
             *REPO.glob("benchmarks/*.py"), *REPO.glob("*.py")]
    offenders = {str(f.relative_to(REPO)): spelled for f in files
                 if f != owner and (spelled := spelled_names(f.read_text()))}
    assert offenders == {}
