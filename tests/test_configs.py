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


@pytest.mark.parametrize("ratio,says", [
    (0.999, r"model.mask_ratio=0.999: keeps 0 of the 250 patches"),
    (0.9975, r"model.mask_ratio=0.9975: keeps 0 of the 250 patches"),
    (1e-17, r"model.mask_ratio=1e-17: keeps 250 of the 250 patches, so no patch is masked"),
])
def test_a_mask_ratio_that_keeps_or_masks_no_patch_is_refused_naming_the_counts(ratio, says):
    from mwmae.train.config import ConfigError

    c = load_config("tiny")
    c.model.mask_ratio = ratio
    with pytest.raises(ConfigError, match=says):
        check_config(c)
    # The masking code's own count decides: the largest ratio it keeps a patch with is fine.
    c.model.mask_ratio = 0.996
    assert model_config_from(c).len_keep == 1
    check_config(c)


def test_a_tagger_keeps_its_mask_ratio_only_to_the_kept_patch_rule():
    from mwmae.finetune.config import tag_config
    from mwmae.train.config import ConfigError

    c = tag_config()
    c.model.mask_ratio = 1e-17   # the tagger masks nothing: no patch to reconstruct is fine
    check_config(c, tag_config())
    c.model.mask_ratio = 0.9999
    with pytest.raises(ConfigError, match=r"model.mask_ratio=0.9999: keeps 0 of the \d+ patches"):
        check_config(c, tag_config())
