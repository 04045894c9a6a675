"""mwmae.hlo_cost and mwmae.aot.gpu_kernels on literal HLO text in the optimised GPU spelling
(names without inline operand types, loops with their proved trip counts)."""

import pytest

from mwmae import aot, hlo_cost

PROGRAM = """HloModule jit_step, is_scheduled=true

%gemm_computation (p0: f32[400,64], p1: f32[64,192]) -> f32[400,192] {
  %p0 = f32[400,64]{1,0} parameter(0)
  %p1 = f32[64,192]{1,0} parameter(1)
  ROOT %dot.1 = f32[400,192]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (arg: (s32[], f32[400,64], f32[64,192])) -> (s32[], f32[400,64], f32[64,192]) {
  %arg = (s32[], f32[400,64]{1,0}, f32[64,192]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[400,64]{1,0} get-tuple-element(%arg), index=1
  %w = f32[64,192]{1,0} get-tuple-element(%arg), index=2
  %gemm = f32[400,192]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_computation, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %kernel = f32[400,64]{1,0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, ir = "...", name = "multi_window_attention_fwd", num_warps = 4 : i32}
  ROOT %t = (s32[], f32[400,64]{1,0}, f32[64,192]{1,0}) tuple(%i, %kernel, %w)
}

%cond (arg.1: (s32[], f32[400,64], f32[64,192])) -> pred[] {
  %arg.1 = (s32[], f32[400,64]{1,0}, f32[64,192]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[400,64], b: f32[64,192], c: bf16[8,32]) -> f32[8,16] {
  %a = f32[400,64]{1,0} parameter(0)
  %b = f32[64,192]{1,0} parameter(1)
  %c = bf16[8,32]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], f32[400,64]{1,0}, f32[64,192]{1,0}) tuple(%zero, %a, %b)
  %loop = (s32[], f32[400,64]{1,0}, f32[64,192]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"},"known_init_step":{"init":"0","step":"1"}}
  %d = bf16[32,16]{1,0} constant({...})
  %gemm.2 = (f32[8,16]{1,0}, s8[1024]{0}) custom-call(%c, %d), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%gemm.2), index=0
}
"""  # noqa: E501 - HLO instructions are long lines

LOOP_FLOPS = 2.0 * 400 * 192 * 64  # the fused dot, per trip
GEMM_FLOPS = 2.0 * 8 * 16 * 32


def test_loop_bodies_count_once_per_trip():
    cost = hlo_cost.program_cost(PROGRAM)
    assert cost["matmul_flops"] == 12 * LOOP_FLOPS + GEMM_FLOPS
    once = hlo_cost.program_cost(PROGRAM, trip_counts=False)
    assert once["matmul_flops"] == LOOP_FLOPS + GEMM_FLOPS
    # The Triton kernel is opaque (its FLOPs are not counted); the cuBLAS call is not.
    assert cost["opaque_custom_calls"] == 1
    assert cost["loops_without_trip_count"] == 0


def test_bytes_are_operands_and_results_of_memory_instructions():
    per_trip = (400 * 64 + 64 * 192 + 400 * 192) * 4 + (400 * 64 * 4) * 2  # fusion, kernel
    gemm = 8 * 32 * 2 + 32 * 16 * 2 + 8 * 16 * 4 + 1024  # operands, result and workspace
    constant_free = 12 * per_trip + gemm
    assert hlo_cost.program_cost(PROGRAM)["bytes_accessed"] == constant_free


def test_a_loop_without_a_proved_trip_count_counts_once_and_is_reported():
    text = PROGRAM.replace('backend_config={"known_trip_count":{"n":"12"},'
                           '"known_init_step":{"init":"0","step":"1"}}', "")
    cost = hlo_cost.program_cost(text)
    assert cost["loops_without_trip_count"] == 1
    assert cost["matmul_flops"] == LOOP_FLOPS + GEMM_FLOPS


def test_convolutions_count_per_direction():
    """The patch embedding as cuDNN runs it: forward and the filter gradient, each 2 x output
    elements x kernel elements per output feature."""
    text = """ENTRY %main (x: f32[8,200,80,1], k: f32[64,4,16,1], g: f32[8,50,5,64]) -> f32[] {
  %x = f32[8,200,80,1]{3,2,1,0} parameter(0)
  %k = f32[64,4,16,1]{3,2,1,0} parameter(1)
  %g = f32[8,50,5,64]{3,2,1,0} parameter(2)
  %fwd = (f32[8,50,5,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %k), window={size=4x16 stride=4x16}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward"
  %bwd = (f32[64,4,16,1]{3,2,1,0}, u8[0]{0}) custom-call(%x, %g), window={size=4x16 stride=4x16}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter"
  ROOT %r = f32[] constant(0)
}
"""  # noqa: E501 - HLO instructions are long lines
    each = 2.0 * (8 * 50 * 5 * 64) * (4 * 16 * 1)
    assert hlo_cost.program_cost(text)["matmul_flops"] == 2 * each


def test_operands_written_inline_are_read_too():
    text = """ENTRY %main (a: bf16[4,8], b: bf16[8,2]) -> bf16[4,2] {
  ROOT %d = bf16[4,2]{1,0} dot(bf16[4,8]{1,0} %a, bf16[8,2]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""  # noqa: E501 - HLO instructions are long lines
    cost = hlo_cost.program_cost(text)
    assert cost["matmul_flops"] == 2.0 * 4 * 2 * 8
    assert cost["bytes_accessed"] == (4 * 8 + 8 * 2 + 4 * 2) * 2


def test_text_without_an_entry_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_cost.program_cost("HloModule m\n")


def test_gpu_kernels_names_libraries_fusions_and_pallas_kernels():
    found = aot.gpu_kernels(PROGRAM)
    assert found["custom_calls"] == {"__cublas$gemm": 1, "__gpu$xla.gpu.triton": 1}
    assert found["libraries"] == {"cublas": 1, "triton": 1}
    assert found["fusion_kinds"] == {"__triton_nested_gemm_fusion": 1}
    assert found["pallas_kernels"] == {"multi_window_attention_fwd": 1}


def test_gpu_target_description_ships_with_the_package():
    text = aot.gpu_target_config("h100")
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
    assert aot.gpu_memory_bytes(text) == 84942979072
    with pytest.raises(SystemExit, match="unknown GPU target"):
        aot.gpu_target_config("no-such-gpu")


STEP = """HloModule jit_step, is_scheduled=true

%fused_dot (p0: bf16[4,50,768], p1: bf16[768,2304]) -> bf16[4,50,2304] {
  %p0 = bf16[4,50,768]{2,1,0} parameter(0)
  %p1 = bf16[768,2304]{1,0} parameter(1)
  ROOT %dot.1 = bf16[4,50,2304]{2,1,0} dot(%p0, %p1), lhs_contracting_dims={2}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[4,50,768], w: bf16[768,2304], p: f32[768,2304]) -> f32[768,2304] {
  %x = bf16[4,50,768]{2,1,0} parameter(0)
  %w = bf16[768,2304]{1,0} parameter(1)
  %p = f32[768,2304]{1,0} parameter(2)
  %gemm_fusion = bf16[4,50,2304]{2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/jvp(MaskedAutoencoder)/backbone.encode/encoder/closed_call/layers/block_0/attn/qkv/dot_general"}
  %loop_transpose_fusion = bf16[4,12,50,64]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_dot, metadata={op_name="jit(step)/transpose(jvp(MaskedAutoencoder))/decoder/closed_call/layers/block_0/attn/add_any"}
  %fmha = bf16[4,50,768]{2,1,0} custom-call(%x), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp(MaskedAutoencoder)/backbone.encode/encoder/closed_call/layers/block_0/attn/dot_product_attention_fwd"}
  ROOT %update = f32[768,2304]{1,0} add(%p, %p), metadata={op_name="jit(step)/add"}
}
"""  # noqa: E501 - HLO instructions are long lines


def test_the_step_is_accounted_part_by_part():
    r = hlo_cost.traffic_by_part(STEP, examples=4)
    mb = lambda n: round(n / 4 / 1e6, 3)
    act, weights, out = 4 * 50 * 768 * 2, 768 * 2304 * 2, 4 * 50 * 2304 * 2
    parts = r["parts"]
    qkv = parts["encoder qkv and output projections"]
    assert qkv["forward"] == mb(act + weights + out) and qkv["backward"] == 0
    assert qkv["gflop"] == round(2 * 4 * 50 * 2304 * 768 / 4 / 1e9, 3)
    # The transpose in the decoder's backward is layout work; the cuDNN call a custom call.
    dec = parts["decoder attention"]
    assert dec["backward"] == dec["layout"] == mb(act + 4 * 12 * 50 * 64 * 2)
    enc = parts["encoder attention"]
    assert enc["forward"] == enc["custom_calls"] == mb(2 * act)
    # Outside the model's differentiation: the update.
    assert parts["optimizer update"]["update"] == mb(3 * 768 * 2304 * 4)
    assert r["custom_call_mb_per_example"] == mb(2 * act)
    assert r["mb_per_example"] == pytest.approx(sum(p["total"] for p in parts.values()), abs=1e-2)
    assert r["xla_visible_mb_per_example"] == pytest.approx(
        r["mb_per_example"] - r["custom_call_mb_per_example"], abs=1e-2)


def test_the_account_refuses_a_program_with_loops():
    with pytest.raises(ValueError, match="unrolled"):
        hlo_cost.traffic_by_part(PROGRAM, examples=1)
