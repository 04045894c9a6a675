"""The paper's published HEAR table ships with the package and loads by key wherever a results
file is taken (``--compare published:KEY``)."""

import importlib.resources
import json
import pathlib
import subprocess
import sys
import tomllib

import pytest

from mwmae.hear import compare

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "published" / "mwmae-b-4x16-4l.json"


def test_the_shipped_table_is_the_published_one():
    shipped = compare.published_tables()["mwmae-b-4x16-4l"]
    assert json.loads(shipped.read_text()) == json.loads(SHARED.read_text())
    models = {m.name: m for m in compare.load("published:mwmae-b-4x16-4l")}
    source = json.loads(SHARED.read_text())
    assert set(models) == set(source["models"]) and len(models) == 2
    for name, tasks in source["models"].items():
        assert set(models[name].scores) == set(tasks)
        for task, entry in tasks.items():
            assert models[name].scores[task].mean == entry["mean"]
            assert models[name].scores[task].ci95 == entry["ci95"]
    assert "official repository" in next(iter(models.values())).source


def test_an_unknown_key_lists_the_known_ones():
    with pytest.raises(compare.ComparisonError,
                       match="published:mwmae-b: no such published table; known: "
                             "published:mwmae-b-4x16-4l"):
        compare.load("published:mwmae-b")


def test_it_ships_as_package_data():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "published/*.json" in data["package-data"]["mwmae.hear"]


def test_the_compare_command_puts_a_run_beside_the_paper(tmp_path):
    first = next(iter(json.loads(SHARED.read_text())["models"].values()))
    run = {"name": "mine", "artifact": "a", "tasks": {
        t: {"mean": v["mean"] - 0.01, "ci95": 0.01, "scores": [v["mean"] - 0.01] * 2,
            "metric": "test_score", "std": 0.0, "n": 2} for t, v in first.items()}}
    (tmp_path / "results.json").write_text(json.dumps(run))
    out = subprocess.run([sys.executable, "-m", "mwmae.hear.compare",
                          str(tmp_path / "results.json"), "published:mwmae-b-4x16-4l"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "MW-MAE-B-4x16-4l (paper)" in out.stdout and "ESC-50" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "mwmae.hear.compare",
                          str(tmp_path / "results.json"), "published:nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: published:nope: no such published table")


def test_the_installed_package_holds_the_table():
    resource = importlib.resources.files("mwmae.hear") / "published" / "mwmae-b-4x16-4l.json"
    assert resource.is_file()
    assert json.loads(resource.read_text()) == json.loads(SHARED.read_text())
