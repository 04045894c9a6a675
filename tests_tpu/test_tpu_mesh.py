"""The trainer's mesh on real TPU topologies: laid out by the torus, not by the device list."""

import pytest

from mwmae import aot
from mwmae.train import sharding


def test_v6e_ring_order_keeps_neighbours_together():
    # A 2x4 v6e slice lists devices row by row; a ring over all 8 chips visits the second row
    # backwards, so each step of the data axis crosses one link.
    mesh = sharding.make_mesh({"preset": "dp"}, aot.topology_devices("v6e:2x4"))
    assert [d.id for d in mesh.devices.flat] == [0, 1, 2, 3, 7, 6, 5, 4]


def test_v5e_tensor_pairs_are_physical_neighbours():
    mesh = sharding.make_mesh({"preset": "fsdp_tp"}, aot.topology_devices("v5e:4x4"))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 2}
    for pair in mesh.devices.reshape(-1, 2):
        (x0, y0, *_), (x1, y1, *_) = (d.coords for d in pair)
        assert abs(x0 - x1) + abs(y0 - y1) == 1, pair


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_every_preset_builds_on_the_slice(topology):
    devices = aot.topology_devices(topology)
    for preset in sharding.PRESETS:
        mesh = sharding.make_mesh({"preset": preset}, devices)
        assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
