"""config.init_from: a run starts from an artifact, an original checkpoint or a workdir."""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from train_helpers import load_config, run_steps

import mwmae
from mwmae.export import export_original
from mwmae.pretrained import InitFromError, pretrained_params
from mwmae.train.config import default_config
from mwmae.train.engine import Engine
from mwmae.train.pretraining import Pretraining


def config_like(model, **changes):
    c = default_config()
    c.model.update({k: tuple(v) if isinstance(v, list) else v
                    for k, v in model.config.to_dict().items()})
    c.model.update(changes)
    c.batch_size, c.num_train_steps, c.steps_per_epoch = 8, 4, 4
    return c


def flat(params):
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(params)).items()}


def test_pretraining_starts_from_the_released_weights(reference_model, original_checkpoint,
                                                      fixtures, tmp_path):
    c = config_like(reference_model)
    c.init_from = str(original_checkpoint)
    t = Engine(Pretraining(c), tmp_path / "wd")
    state = t.initial_state()
    got, want = flat(state.params), flat(reference_model.params)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    started = mwmae.api.Model(reference_model.config, jax.device_get(state.params))
    np.testing.assert_array_equal(np.asarray(started.features(fixtures["input"])),
                                  np.asarray(reference_model.features(fixtures["input"])))


@pytest.mark.slow  # an export and two initialisations
def test_an_encoder_only_artifact_starts_the_encoder_and_leaves_a_fresh_decoder(
        reference_model, original_checkpoint, tmp_path):
    export_original(str(original_checkpoint), str(tmp_path / "art"))
    c = config_like(reference_model)
    fresh = flat(Engine(Pretraining(c), tmp_path / "a").initial_state().params)
    c.init_from = str(tmp_path / "art")
    got = flat(Engine(Pretraining(c), tmp_path / "b").initial_state().params)
    want = flat(reference_model.params)
    for k in got:
        expected = want[k] if k.split("/")[0] in mwmae.model.encoder_keys(
            reference_model.config) else fresh[k]
        np.testing.assert_array_equal(got[k], expected, err_msg=k)
    assert any(not np.array_equal(got[k], want[k]) for k in got if k.startswith("decoder"))


@pytest.mark.slow  # a short pretraining run first
def test_a_workdir_step_starts_a_run_and_training_goes_on_from_it(tmp_path):
    from mwmae.train.loop import train

    c = load_config("tiny")
    c.num_train_steps, c.log_every_steps = 4, 2
    c.checkpoint.every_steps = 2
    train(Pretraining, c, tmp_path / "pre", print_fn=lambda s: None)
    c2 = load_config("tiny")
    c2.init_from, c2.init_from_step = str(tmp_path / "pre"), 2
    params = flat(Engine(Pretraining(c2), tmp_path / "next").initial_state().params)
    _, step2, _ = mwmae.workdir.Workdir(tmp_path / "pre").read_params(2, with_decoder=True)
    for k, v in flat(step2).items():
        np.testing.assert_array_equal(params[k], v, err_msg=k)
    assert np.isfinite(run_steps(c2, jax.devices()[:1], steps=2)).all()


def test_a_mismatched_architecture_is_refused_naming_what_differs(reference_model,
                                                                  original_checkpoint):
    src, base = str(original_checkpoint), reference_model.config
    wider = base.replace(embed_dim=base.embed_dim * 2)
    with pytest.raises(InitFromError, match=r"init_from=.*embed_dim: 192 there, 384 here"):
        pretrained_params(src, None, wider, with_decoder=True)
    with pytest.raises(InitFromError, match="shifting_windows: False there, True here"):
        pretrained_params(src, None, base.replace(shifting_windows=True), with_decoder=False)
    other_decoder = base.replace(decoder_window_sizes=(0,))
    with pytest.raises(InitFromError, match="its decoder is not this run's.*decoder_window_sizes"):
        pretrained_params(src, None, other_decoder, with_decoder=True)
    # Fine-tuning takes the encoder alone: the decoder's differences do not matter then.
    assert set(pretrained_params(src, None, other_decoder, with_decoder=False)) == set(
        mwmae.model.encoder_keys(base))


def test_missing_source_and_a_step_for_a_non_workdir_are_clear_errors(reference_model,
                                                                     original_checkpoint,
                                                                     tmp_path):
    with pytest.raises(InitFromError, match="nowhere: no such file or directory"):
        pretrained_params(str(tmp_path / "nowhere"), None, reference_model.config,
                          with_decoder=True)
    with pytest.raises(InitFromError, match="applies to a training workdir only"):
        pretrained_params(str(original_checkpoint), 3, reference_model.config,
                          with_decoder=True)


def test_a_bad_source_fails_before_the_workdir_is_written_so_a_fixed_rerun_starts(tmp_path):
    from mwmae.train.loop import train

    c = load_config("tiny")
    c.init_from = str(tmp_path / "typo")
    with pytest.raises(InitFromError, match="typo: no such file or directory"):
        train(Pretraining, c, tmp_path / "wd", print_fn=lambda s: None)
    assert not (tmp_path / "wd" / "config.json").exists()
