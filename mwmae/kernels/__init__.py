"""Multi-window attention: the one entry point the model calls.

``implementation`` selects how it is computed:
  * ``"xla"``: the vectorised jax.numpy reference (``reference.py``), the CPU default;
  * ``"auto"``: on TPU v4 and later the fused Mosaic kernel; on an NVIDIA GPU cuDNN for every
    layer it takes (bfloat16/float16, see ``cudnn.py``); else ``"xla"`` (CPU, TPU v2/v3,
    float32 on a GPU, sequences over 1024 tokens). The Triton kernel is ``"auto"``'s GPU
    fallback only on JAX before 0.11, whose Pallas still maintains Triton lowering;
  * ``"pallas"``: the fused kernel for the platform, an error where there is none (CPU, TPU v3);
  * ``"pallas_tpu"`` / ``"pallas_gpu"``: one kernel explicitly (compiled);
  * ``"pallas_interpret"``: the TPU kernel under the generic Pallas interpreter (any backend;
    for tests and debugging, slow);
  * ``"pallas_tpu_interpret"``: the TPU kernel under the TPU interpreter, which also simulates
    VMEM and detects races (very slow);
  * ``"pallas_gpu_interpret"``: the GPU kernel under the generic Pallas interpreter;
  * ``"cudnn"``: cuDNN's fused attention (``cudnn.py``), windows given to it as a dense bias
    and mask, on NVIDIA GPUs in bfloat16/float16.
Every implementation has the same contract, supports jit and grad (bias tables included), and
agrees with the reference to float32 rounding.

``"auto"`` follows a measured plan when one is in scope (:func:`mwmae.kernels.plan.use_plan`:
the trainer installs the choices a preflight measured on this device, after its numerics guard);
a layer the plan does not name gets the rule above.

``multi_window_attention_with_probs`` also returns the attention probabilities, for analysis;
it always runs the reference, since the fused kernels never hold a whole probability matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax

from mwmae.kernels.cudnn import unsupported as cudnn_unsupported
from mwmae.kernels.plan import planned
from mwmae.kernels.reference import attention_xla, attention_xla_with_probs, check_call

IMPLEMENTATIONS = (
    "auto",
    "xla",
    "pallas",
    "pallas_tpu",
    "pallas_gpu",
    "pallas_interpret",
    "pallas_tpu_interpret",
    "pallas_gpu_interpret",
    "cudnn",
)

# Above this the TPU kernel's whole-sequence VMEM blocks stop fitting comfortably; "auto" then
# falls back to the reference (the model's sequences are 250 tokens).
_MAX_KERNEL_LENGTH = 1024

# TPU generations whose Mosaic cannot take the kernel ("Unsupported matmul RHS type" for
# bfloat16 operands on v3, the compute dtype of every real config); "auto" uses XLA there.
_TPU_WITHOUT_KERNEL = ("TPU v2", "TPU v3")

_warned: set[str] = set()

# Pallas lowers through Triton on GPU; from JAX 0.11 that backend is deprecated for Mosaic GPU,
# so "auto" takes the Triton kernel only on older JAX (where it was measured to pay).
TRITON_MAINTAINED = tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 11)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.warning(message)


def target_device():
    """The kind of device code is being compiled for: that of the mesh in scope (``jax.set_mesh``,
    inside jit too), which may be an abstract TPU topology on a CPU host; else the default
    backend's first device. Anything with ``platform`` and ``device_kind``."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device
    return jax.devices()[0]


def resolve_implementation(implementation: str, length: int | None = None,
                           devices: Sequence | None = None, *,
                           window_sizes: Sequence[int] | None = None, shift: bool = False,
                           dtype: str | None = None, head_dim: int | None = None) -> str:
    """The concrete implementation ``implementation`` stands for on ``devices``.

    ``devices`` are the devices the computation is compiled for (default: ``target_device()``);
    their platform, never ``jax.default_backend()``, decides, so an AOT compile for a TPU
    topology on a CPU host picks what a TPU host would. For ``"auto"``, a plan in scope that
    names the layer (``length``, ``window_sizes``, ``shift``) decides first. On an NVIDIA GPU,
    ``"auto"`` takes cuDNN for a layer known (``window_sizes``, ``shift``, ``dtype`` bfloat16
    or float16, ``head_dim`` and ``length`` when given) to be one cuDNN takes; otherwise the
    Triton kernel on JAX before 0.11, XLA after.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; expected one of "
                         f"{IMPLEMENTATIONS}")
    if implementation not in ("auto", "pallas"):
        return implementation
    if implementation == "auto" and length is not None and window_sizes is not None:
        chosen = planned(length, window_sizes, shift)
        if chosen is not None:
            return chosen
    device = target_device() if devices is None else list(devices)[0]
    platform = device.platform
    if platform == "tpu":
        kind = str(getattr(device, "device_kind", ""))
        if kind.startswith(_TPU_WITHOUT_KERNEL):
            if implementation == "pallas":
                raise ValueError(f"the Pallas attention kernel does not compile for {kind}; use "
                                 "'auto' or 'xla'")
            _warn_once(f"attention: {kind} cannot compile the Pallas kernel; using the XLA "
                       "attention")
            return "xla"
        kernel = "pallas_tpu"
    elif platform in ("gpu", "cuda", "rocm"):
        if (implementation == "auto" and platform != "rocm" and window_sizes is not None
                and dtype in ("bfloat16", "float16")
                and cudnn_unsupported(window_sizes, head_dim, length) is None):
            return "cudnn"  # a maintained library kernel, and no layout change around it
        if implementation == "auto" and not TRITON_MAINTAINED:
            return "xla"
        kernel = "pallas_gpu"
    elif implementation == "pallas":
        raise ValueError(f"no compiled Pallas attention kernel for the {platform!r} platform; "
                         "use 'auto', 'xla' or 'pallas_interpret'")
    else:
        return "xla"
    if implementation == "auto" and length is not None and length > _MAX_KERNEL_LENGTH:
        return "xla"
    return kernel


def multi_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    window_sizes: Sequence[int],
    bias_tables: jax.Array,
    shift: bool = False,
    *,
    scale: float | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Attention where head h attends within windows of ``window_sizes[h]`` tokens (0 = global).

    q, k, v: (batch, heads, length, head_dim); bias_tables: (heads, T), T >= 2 * max(w) - 1.
    Returns (batch, heads, length, head_dim).
    """
    heads = check_call(q, k, v, window_sizes, bias_tables, shift, scale)
    impl = resolve_implementation(implementation, q.shape[2], window_sizes=heads.window_sizes,
                                  shift=heads.shift, dtype=q.dtype.name, head_dim=q.shape[-1])
    if impl == "xla":
        return attention_xla(q, k, v, bias_tables, heads)
    if impl == "cudnn":
        from mwmae.kernels.cudnn import attention_blhd

        swap = lambda t: t.swapaxes(1, 2)  # the model calls attention_blhd in its own layout
        return swap(attention_blhd(swap(q), swap(k), swap(v), heads, bias_tables))
    if impl in ("pallas_tpu", "pallas_interpret", "pallas_tpu_interpret"):
        from mwmae.kernels.pallas_tpu import attention_tpu

        interpret = {"pallas_tpu": False, "pallas_interpret": "generic",
                     "pallas_tpu_interpret": "tpu"}[impl]
        return attention_tpu(q, k, v, bias_tables, heads, interpret)
    from mwmae.kernels.pallas_gpu import attention_gpu

    if impl == "pallas_gpu" and not TRITON_MAINTAINED:
        _warn_once(f"attention: the Triton kernel ('pallas_gpu') lowers through Pallas' Triton "
                   f"backend, deprecated in JAX {jax.__version__}; 'auto' takes cuDNN or XLA")
    return attention_gpu(q, k, v, bias_tables, heads, impl == "pallas_gpu_interpret")


def multi_window_attention_with_probs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    window_sizes: Sequence[int],
    bias_tables: jax.Array,
    shift: bool = False,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The XLA reference's output and its attention probabilities, float32
    (batch, heads, length, length), zero outside each windowed head's window."""
    heads = check_call(q, k, v, window_sizes, bias_tables, shift, scale)
    return attention_xla_with_probs(q, k, v, bias_tables, heads)
