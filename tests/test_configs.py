"""Every config in configs/ loads, passes its trainer's check and is in the training guide's
table with the parameter count its model really has (the tagger's: its default variant's
encoder)."""

import math
import pathlib
import re

import jax
import pytest
from train_helpers import config_module, load_config

from mwmae.model import param_shapes
from mwmae.train.config import check_config, model_config_from

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


def readme_table() -> dict[str, int]:
    text = (REPO / "docs" / "guides" / "training.md").read_text()
    section = text[text.index("## Configs"):text.index("## Training")]
    return {m.group(1): int(m.group(2).replace(",", ""))
            for m in re.finditer(r"^\| `(\w+)\.py` \|.*\| ([\d,]+) \|$", section, re.M)}


def test_the_training_guide_lists_every_config():
    assert set(readme_table()) == set(CONFIGS)


TAGGER_CONFIGS = ("tag",)  # run by python -m mwmae.finetune, with variants


@pytest.mark.parametrize("name", [c for c in CONFIGS if c not in TAGGER_CONFIGS])
def test_config_loads_checks_and_has_the_documented_size(name):
    config = load_config(name)
    check_config(config)
    shapes = param_shapes(model_config_from(config))
    count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    assert count == readme_table()[name]
    doc = (REPO / "configs" / f"{name}.py").read_text().split('"""')[1]
    assert "python -m mwmae.train" in doc or "scripts/demo.sh" in doc, name


@pytest.mark.parametrize("name", TAGGER_CONFIGS)
def test_tagger_config_variants_load_and_check(name):
    from mwmae.finetune.config import check_tag_config

    for variant in config_module(name).VARIANTS:
        check_tag_config(load_config(name, variant))
    with pytest.raises(ValueError, match="expected one of"):
        load_config(name, "no-such-variant")
    shapes = param_shapes(model_config_from(load_config(name)), encoder_only=True)
    count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    assert count == readme_table()[name]
    doc = (REPO / "configs" / f"{name}.py").read_text().split('"""')[1]
    assert "python -m mwmae.finetune --config configs/tag.py:VARIANT" in doc
