"""The model family from one helper: every variant builds and has a parameter count, the base
variants are exactly today's per-file configs, and a bad variant says what is wrong."""

import math

import jax
import pytest
from train_helpers import load_config

from mwmae.model import param_shapes
from mwmae.train.config import check_config, model_config_from, paper_base_config
from mwmae.train.family import DECODER_ABLATIONS, family, parse_variant, pretrain_config


def count(config) -> int:
    shapes = param_shapes(model_config_from(config))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("variant", family() + list(DECODER_ABLATIONS))
def test_every_variant_builds_and_checks(variant):
    c = pretrain_config(variant)
    check_config(c)
    assert parse_variant(variant).name == variant
    assert count(c) > 0


def test_sizes_grow_and_the_base_variants_are_todays_configs():
    counts = {v: count(pretrain_config(v)) for v in family(("mwmae",))}
    assert list(counts.values()) == sorted(counts.values())
    assert counts["mwmae-B-4x16"] == 92_814_576
    for variant, name, kind in (("mwmae-B-4x16", "mwmae_base_200_4x16", "mwmae"),
                                ("mae-B-4x16", "mae_base_200_4x16", "mae")):
        # The paper's recipe as it was written before the family existed, value for value.
        want = paper_base_config(kind).to_dict()
        assert pretrain_config(variant).to_dict() == want
        assert load_config(name).to_dict() == want
        assert load_config("pretrain", variant).to_dict() == want


def test_bad_variants_are_refused_with_the_grammar_or_the_field():
    with pytest.raises(ValueError, match="expected KIND-SIZE-PxQ"):
        parse_variant("mwmae-X-4x16")
    with pytest.raises(ValueError, match="expected KIND-SIZE-PxQ"):
        parse_variant("vit-B-4x16")
    with pytest.raises(ValueError, match="does not divide the 125 tokens"):
        pretrain_config("mwmae-B-8x16")
    c = pretrain_config("mwmae-B-8x16-w5.25.125.0.0.5.25.125")
    assert c.model.decoder_window_sizes == (5, 25, 125, 0, 0, 5, 25, 125)
    assert pretrain_config("mwmae-B-8x16-w25").model.decoder_window_sizes == (25,) * 8
    with pytest.raises(ValueError, match="not a multiple of its 8 heads"):
        pretrain_config("mwmae-B-4x16-d4x100")


def test_the_training_guide_lists_every_variant_with_its_counts():
    import pathlib
    import re

    from mwmae.model_info import parameter_counts

    readme = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "training.md"
              ).read_text()
    found = re.findall(r"^\| `([a-z]+-[A-Z]-[\dx.dw-]+)` \| ([\d,]+) \| ([\d,]+) \|$", readme,
                       re.M)
    assert sorted(v for v, _, _ in found) == sorted(family() + list(DECODER_ABLATIONS))
    decoder_side = ("decoder", "decoder_embed", "decoder_norm", "decoder_pos_embed",
                    "decoder_pred", "mask_token")
    for variant, total, encoder in found:
        counts = parameter_counts(model_config_from(pretrain_config(variant)))
        assert counts["total"] == int(total.replace(",", "")), variant
        kept = counts["total"] - sum(counts.get(k, 0) for k in decoder_side)
        assert kept == int(encoder.replace(",", "")), variant
