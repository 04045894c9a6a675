"""Reading a compiled program's collectives from HLO text (mwmae.collectives), on literal strings:
the replica-group spellings, MegaScale transfers between slices, and the per-axis summary."""

import pytest

from mwmae import collectives

# A per-slice program of a 2-slice, 8-device job (num_partitions=4), trimmed to what the
# parser reads, in the spelling libtpu 0.0.42 writes.
PER_SLICE = """HloModule jit_train_step, is_scheduled=true, num_partitions=4, frontend_attributes={}

%add.clone (x.3: f32[], y.1: f32[]) -> f32[] {
  %x.3 = f32[] parameter(0)
  %y.1 = f32[] parameter(1)
  ROOT %add.1 = f32[]{:T(128)} add(%x.3, %y.1), backend_config={"flag_configs":[]}
}

%max.2 (a: f32[], b: f32[]) -> f32[] {
  ROOT %maximum.1 = f32[] maximum(%a, %b)
}

%all-reduce-scatter.14 (input_0: f32[64,256]) -> (f32[16,256]) {
  %all-reduce.321 = (f32[64,256]{1,0:T(8,128)}) all-reduce(%input_0), channel_id=5, replica_groups=[1,4]<=[4], use_global_device_ids=true, to_apply=%add.clone
  ROOT %tuple.221 = (f32[16,256]{1,0:T(8,128)}) tuple(%x)
}

ENTRY %main.0_spmd (param.1: f32[4,16]) -> f32[4,16] {
  %all-gather.3 = f32[4,4,16]{2,1,0:T(4,128)S(1)} all-gather(%bitcast.11), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}, use_global_device_ids=true, backend_config={"x":{"emitter":"1DAllGatherOnMajorDim"}}
  %all-reduce-start.2 = bf16[8,128]{1,0} all-reduce-start(%p), channel_id=3, replica_groups={{0,1},{2,3}}, use_global_device_ids=true, to_apply=%max.2
  %fusion.482 = (f32[16,256]{1,0:T(8,128)}) fusion(%all-reduce.2, %g), kind=kCustom, calls=%all-reduce-scatter.14
  %send = (f32[1,4,128]{2,1,0:T(4,128)}, u32[], token[]) send(%bitcast.1, %after-all), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.1_0",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}, backend_config={"flag_configs":[]}
  %recv = (f32[1,4,128]{2,1,0:T(4,128)}, u32[], token[]) recv(%after-all), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send.7 = (f32[1,128]{1,0:T(1,128)}, u32[], token[]) send(%param, %after-all), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_target={{100000->200000},{200000->100000}},_xla_megascale_transfer_type="ONE_TO_ONE"}
  %send.9 = (f32[4]{0}, token[]) send(%y, %after-all), channel_id=9, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="outfeed"}
  ROOT %copy.4 = f32[4,16]{1,0:T(4,128)} copy(%bitcast.7)
}
"""  # noqa: E501 - HLO instructions are long lines
# Mesh order of a hybrid (data 2 between slices, fsdp 4 inside) mesh over two v5e:2x2 slices.
DEVICE_IDS = [100000, 100001, 100003, 100002, 200000, 200001, 200003, 200002]
SLICE_OF = [0, 0, 0, 0, 1, 1, 1, 1]
MESH = {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("text,groups", [
    ("{{0,1},{2,3}}", [[0, 1], [2, 3]]),
    ("{{0,1,2,3}}", [[0, 1, 2, 3]]),
    ("{{0},{1}}", [[0], [1]]),
    ("[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    # iota(8) as 2x4, transposed, as 4 groups of 2: strided pairs.
    ("[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
    ("[1,4]<=[4]", [[0, 1, 2, 3]]),
    ("{}", [[0, 1, 2, 3]]),
    # The mesh-axes form (XLA's CPU backend writes it): groups over the named axes.
    ("mesh['axis_0'=2,'axis_1'=1] {'axis_0'}", [[0, 1]]),
    ("mesh['x'=2,'y'=2] {'x'}", [[0, 2], [1, 3]]),
    ("mesh['x'=2,'y'=2] {'y'}", [[0, 1], [2, 3]]),
    ("mesh['x'=2,'y'=2] {'x','y'}", [[0, 1, 2, 3]]),
    ("mesh['x'=2,'y'=2]<=[2,2]T(1,0) {'y'}", [[0, 2], [1, 3]]),
])
def test_replica_group_spellings(text, groups):
    assert collectives.parse_replica_groups(text, num_partitions=4) == groups


def test_unknown_replica_groups_are_an_error():
    with pytest.raises(ValueError, match="unrecognised"):
        collectives.parse_replica_groups("all of them")
    with pytest.raises(ValueError, match="unrecognised"):
        collectives.parse_replica_groups("mesh['x'=4] {'x':(1)2}")  # sub-axes: not read
    with pytest.raises(ValueError, match="num_partitions"):
        collectives.parse_replica_groups("{}")


def test_per_slice_program_collectives():
    found = {c.name: c for c in collectives.hlo_collectives(PER_SLICE, DEVICE_IDS)}
    # recv halves and non-MegaScale host transfers are not counted; the fusion is not a
    # collective itself (its computation's all-reduce is).
    assert set(found) == {"all-gather.3", "all-reduce-start.2", "all-reduce.321", "send",
                          "send.7"}
    gather = found["all-gather.3"]
    # The same ICI collective runs in both slices' programs: one group per slice.
    assert (gather.op, gather.network) == ("all-gather", "ici")
    assert gather.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert gather.bytes == 4 * 4 * 16 * 4
    assert found["all-reduce-start.2"].reduction == "MAX"
    assert found["all-reduce-start.2"].groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    rs = found["all-reduce.321"]
    assert (rs.op, rs.reduction) == ("reduce-scatter", "SUM")  # inside all-reduce-scatter.*
    dcn = found["send"]
    assert (dcn.op, dcn.network, dcn.reduction) == ("all-reduce", "dcn", "SUM")
    # Slices 1 and 2 (MegaScale counts from 1), each local partition with its counterpart.
    assert dcn.groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert dcn.bytes == 4 * 128 * 4
    permute = found["send.7"]
    assert (permute.op, permute.network) == ("collective-permute", "dcn")
    assert permute.groups == ((0, 4), (4, 0))  # device ids mapped to mesh positions


def test_device_count_must_split_into_programs():
    with pytest.raises(ValueError, match="do not split"):
        collectives.hlo_collectives(PER_SLICE, DEVICE_IDS[:6])


def test_axes_of_group():
    assert collectives.axes_of_group([0, 4], MESH) == ["data"]
    assert collectives.axes_of_group([0, 1, 2, 3], MESH) == ["fsdp"]
    assert collectives.axes_of_group([0, 5], MESH) == ["data", "fsdp"]
    assert collectives.axes_of_group([3], MESH) == []


def test_summary_says_what_crosses_slices():
    rows = collectives.summary(collectives.hlo_collectives(PER_SLICE, DEVICE_IDS), SLICE_OF,
                               MESH)
    by_op = {(r["op"], r["network"]): r for r in rows}
    assert by_op[("all-reduce", "dcn")]["crosses_slices"] is True
    assert by_op[("all-reduce", "dcn")]["axes"] == ["data"]
    assert by_op[("collective-permute", "dcn")]["crosses_slices"] is True
    for key in [("all-gather", "ici"), ("all-reduce", "ici"), ("reduce-scatter", "ici")]:
        assert by_op[key]["crosses_slices"] is False, key
    assert by_op[("all-gather", "ici")]["axes"] == ["fsdp"]
    assert all(r["count"] == 1 for r in rows)
    # A group spanning the slice boundary in an ICI collective is reported as crossing.
    wrong = collectives.summary(
        [collectives.Collective("x", "all-gather", "ici", ((3, 4),))], SLICE_OF, MESH)
    assert wrong[0]["crosses_slices"] is True and wrong[0]["axes"] == ["data", "fsdp"]
