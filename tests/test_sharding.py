"""Mesh presets: same numbers as one device, partition specs pinned by golden files."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from train_helpers import load_config, run_steps

from mwmae.train import sharding
from mwmae.train.engine import Engine
from mwmae.train.pretraining import Pretraining

GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def single_device_losses():
    return run_steps(load_config("tiny"), jax.devices()[:1])


# dp in the default suite; the other presets (each an 8-device run over 30 s) in CI's slow group.
@pytest.mark.parametrize("preset", ["dp", pytest.param("fsdp", marks=pytest.mark.slow),
                                    pytest.param("fsdp_tp", marks=pytest.mark.slow)])
def test_preset_matches_single_device(preset, single_device_losses):
    config = load_config("tiny")
    config.mesh.preset = preset
    losses = run_steps(config, jax.devices()[:8])
    # float32; sharded reductions sum in a different order, so allow rounding, not drift.
    np.testing.assert_allclose(losses, single_device_losses, rtol=2e-5)
    assert losses[-1] < losses[0]


# dp in the default suite; the other presets (each an 8-device run over 30 s) in CI's slow group.
@pytest.mark.parametrize("preset", ["dp", pytest.param("fsdp", marks=pytest.mark.slow),
                                    pytest.param("fsdp_tp", marks=pytest.mark.slow)])
def test_partition_specs_match_golden(preset):
    config = load_config("tiny")
    config.mesh.preset = preset
    t = Engine(Pretraining(config), "/tmp/unused", devices=jax.devices()[:8])
    got = sharding.describe(t.state_sharding.params)
    path = GOLDEN / f"partition_specs_tiny_{preset}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text()), f"partition specs changed; see {path.name}"


def test_fsdp_shards_params_and_optimizer_state():
    config = load_config("tiny")
    config.mesh.preset = "fsdp_tp"
    t = Engine(Pretraining(config), "/tmp/unused", devices=jax.devices()[:8])
    state = t.initial_state()
    fc1 = state.params["encoder"]["layers"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    mu = state.opt_state[0].mu["encoder"]["layers"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert mu.sharding.spec == fc1.sharding.spec
    # each device holds 1/8 of the kernel
    assert fc1.addressable_shards[0].data.size * 8 == fc1.size


@pytest.mark.parametrize("change,message", [
    ({"batch_size": 12}, "batch_size 12 is not divisible by the 8 batch shards"),
    ({"mesh.data": 3}, "has 3 devices but 8 are available"),
    ({"mesh.preset": "zero9"}, "unknown mesh preset 'zero9'"),
    ({"grad_accum_steps": 3}, "grad_accum_steps 3"),
])
def test_config_errors_fail_before_compiling(change, message):
    config = load_config("tiny")
    for k, v in change.items():
        node = config
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    with pytest.raises(ValueError, match=message):
        Engine(Pretraining(config), "/tmp/unused", devices=jax.devices()[:8])


def test_unknown_config_key_is_rejected():
    config = load_config("tiny")
    config.unlocked = True
    with config.unlocked():
        config.optimizer.learning_rte = 1.0
    want = ("unknown config key 'optimizer.learning_rte'; nearest valid: "
            "optimizer.base_learning_rate")
    with pytest.raises(ValueError, match=want):
        Engine(Pretraining(config), "/tmp/unused", devices=jax.devices()[:1])


def test_attention_shard_map_axes_come_from_the_rules(monkeypatch):
    import flax.linen as nn

    from mwmae.model import blocks

    seen = {}
    monkeypatch.setattr(blocks, "sharded_multi_window_attention",
                        lambda q, *a, **k: seen.update(k) or q)
    mesh = sharding.make_mesh({"preset": "fsdp_tp"}, jax.devices()[:8])
    q = np.zeros((8, 8, 16, 4), np.float32)

    def call(rules, window_sizes=(0,) * 8):
        seen.clear()
        with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
            blocks.attention(q, q, q, window_sizes, None, False, "pallas_interpret")
        return seen["batch_axes"], seen["head_axis"]

    assert call(sharding.LOGICAL_RULES) == (("data", "fsdp"), "tensor")
    # 3 heads do not split over 2 tensor shards: the kernel sees them all.
    assert call(sharding.LOGICAL_RULES, (0, 0, 0)) == (("data", "fsdp"), None)
    other = [(n, ("fsdp",) if n == "act_batch" else None if n == "act_heads" else a)
             for n, a in sharding.LOGICAL_RULES]
    assert call(other) == (("fsdp",), None)


def test_mesh_follows_the_rules_and_the_device_topology():
    assert sharding.mesh_axes("act_batch") == ("data", "fsdp")
    assert sharding.mesh_axes("heads") == ("tensor",) and sharding.mesh_axes("norm") == ()
    with pytest.raises(KeyError, match="no logical-axis rule for 'nope'"):
        sharding.mesh_axes("nope")
    mesh = sharding.make_mesh({"preset": "fsdp_tp"}, jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    # CPU devices have no torus: the layout is the device order.
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[:8]]


@pytest.mark.parametrize("mesh_config,shape", [
    # A preset describes one slice: the slices multiply the data axis only.
    ({"preset": "fsdp", "dcn_data": 2}, {"data": 2, "fsdp": 4, "tensor": 1}),
    ({"preset": "fsdp_tp", "dcn_data": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
    ({"preset": "dp", "dcn_data": 2}, {"data": 8, "fsdp": 1, "tensor": 1}),
    ({"preset": "fsdp", "dcn_data": 1}, {"data": 1, "fsdp": 8, "tensor": 1}),
    # Explicit axis sizes stay global.
    ({"data": 4, "fsdp": -1, "tensor": 1, "dcn_data": 2}, {"data": 4, "fsdp": 2, "tensor": 1}),
])
def test_multi_slice_mesh_shapes(mesh_config, shape):
    assert sharding.mesh_shape(mesh_config, 8) == shape


def test_data_axis_must_span_the_slices():
    with pytest.raises(ValueError, match=r"data axis \(1\) spans the 2 slices"):
        sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 2},
                           jax.devices()[:8])


def test_cpu_devices_are_one_slice():
    placement = sharding.slice_placement(sharding.make_mesh({"preset": "fsdp_tp"},
                                                            jax.devices()[:8]))
    assert placement["crosses_slices"] == {"data": False, "fsdp": False, "tensor": False}
    assert placement["slice_index"] == [[[0, 0], [0, 0], [0, 0], [0, 0]]]
