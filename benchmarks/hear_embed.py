"""HEAR embedding throughput: seconds of audio embedded per second, waveform in, embeddings out,
with the JAX and the PyTorch backend side by side.

    python benchmarks/hear_embed.py [--size base] [--clips 2,10] [--batches 1,32]
        [--dtypes float32,bfloat16] [--repeats 2] [--max-batch N] [--backends jax,torch]

Random weights of the paper's architecture (``mwmae.model_config(size)``), written once as an
artifact that both backends load (:class:`mwmae.hear.embed.Embedder` and
:class:`mwmae.hear.torch_embed.TorchEmbedder`, as ``mwmae.hear.load_model(path, backend=...)``
builds them), so they run the same model on the same clips with the same chunks per encoder
call. The whole path of ``get_timestamp_embeddings`` is timed (numpy log-mel, normalisation,
chunking, the encoder, copies back to the host). Per configuration and backend: the first call
(JAX compiles), then the best of ``--repeats`` timed calls; for JAX, whether any call after the
first traced the encoder again (it must not: the chunk batches fall into buckets compiled on the
first call). Two rates: ``audio_seconds_per_second`` (the clips' audio) and
``chunk_audio_seconds_per_second`` (the 2 s chunks the encoder ran, padding included: a 2 s clip
is 201 frames, two chunks). ``side_by_side`` puts the backends of each configuration together,
with the largest difference of their embeddings. Prints JSON. On a shared machine the figures
vary by tens of percent; compare runs of one session.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

# Both backends may share one GPU: JAX must not take most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import mwmae  # noqa: E402
from mwmae.artifact import save_artifact  # noqa: E402
from mwmae.hear.embed import Embedder, max_batch_default, padded_chunk_count  # noqa: E402
from mwmae.model import init_params  # noqa: E402

BACKENDS = ("jax", "torch")
CHUNK_SECONDS = 2.0


def make_embedder(backend: str, artifact: str, dtype: str, max_batch: int) -> Any:
    if backend == "jax":
        return Embedder(mwmae.load(artifact, dtype=dtype), max_batch=max_batch)
    from mwmae.hear.torch_embed import TorchEmbedder

    return TorchEmbedder.load(artifact, max_batch=max_batch, dtype=dtype)


def device_of(backend: str, embedder: Any) -> str:
    if backend == "jax":
        return str(jax.devices()[0].device_kind)
    return str(embedder.device)


def run(backend: str, embedder: Any, size: str, clip_s: float, batch: int, dtype: str,
        repeats: int, max_batch: int) -> tuple[dict[str, Any], np.ndarray]:
    """One configuration on one backend: its figures and the embeddings of the last call."""
    rng = np.random.default_rng(0)
    wav = rng.uniform(-0.5, 0.5, (batch, int(clip_s * 16000))).astype(np.float32)
    traces = lambda: getattr(embedder, "traces", None)  # noqa: E731 - only JAX compiles
    t0 = time.perf_counter()
    embedder.timestamp_embeddings(wav)
    first = time.perf_counter() - t0
    traces_after_first = traces()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb, _ = embedder.timestamp_embeddings(wav)
        times.append(time.perf_counter() - t0)
    best = min(times)
    chunks = batch * padded_chunk_count(wav.shape[1])
    return {
        "backend": backend, "device": device_of(backend, embedder), "size": size,
        "clip_seconds": clip_s, "batch": batch, "dtype": dtype, "chunks": chunks,
        "max_batch": max_batch, "first_call_seconds": round(first, 3), "seconds": round(best, 3),
        "audio_seconds_per_second": round(batch * clip_s / best, 2),
        "chunk_audio_seconds_per_second": round(chunks * CHUNK_SECONDS / best, 2),
        "recompiled_after_first_call": (None if traces() is None
                                        else traces() != traces_after_first),
        "encoder_compilations": traces(), "embedding_shape": list(emb.shape),
    }, np.asarray(emb, np.float32)


def side_by_side(results: list[dict[str, Any]], differences: dict[tuple, float]
                 ) -> list[dict[str, Any]]:
    """The backends' rates per configuration, the ratio to the first backend, and how far
    their embeddings lie apart."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r["dtype"], r["clip_seconds"], r["batch"])
        row = rows.setdefault(key, {"dtype": r["dtype"], "clip_seconds": r["clip_seconds"],
                                    "batch": r["batch"], "chunks": r["chunks"]})
        row[r["backend"]] = {"chunk_audio_seconds_per_second": r["chunk_audio_seconds_per_second"],
                             "audio_seconds_per_second": r["audio_seconds_per_second"]}
    for key, row in rows.items():
        present = [b for b in BACKENDS if b in row]
        if len(present) > 1:
            base = row[present[0]]["chunk_audio_seconds_per_second"]
            for other in present[1:]:
                row[f"{other}_over_{present[0]}"] = round(
                    row[other]["chunk_audio_seconds_per_second"] / base, 3)
            row["max_abs_difference"] = differences.get(key)
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--clips", default="2,10", help="clip lengths in seconds")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=0, help="chunks per encoder call, both "
                   "backends (default: 8 on CPU, 128 on accelerators)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated: jax, torch (default: both)")
    a = p.parse_args(argv)
    backends = [b for b in a.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        print(f"error: --backends {a.backends!r}: expected some of {', '.join(BACKENDS)}",
              file=sys.stderr)
        return 2
    if "torch" in backends:
        try:
            import torch

            from mwmae.hear import torch_embed  # noqa: F401
        except ImportError as e:
            print(f"error: the torch backend cannot be imported ({e}); pass --backends jax",
                  file=sys.stderr)
            return 2
    max_batch = a.max_batch or max_batch_default()
    config = mwmae.model_config(a.size)
    results: list[dict[str, Any]] = []
    differences: dict[tuple, float] = {}
    with tempfile.TemporaryDirectory(prefix="hear-embed-bench-") as tmp:
        artifact = os.path.join(tmp, "artifact")
        save_artifact(artifact, config, init_params(config, jax.random.key(0)),
                      encoder_only=True)
        for dtype in a.dtypes.split(","):
            embedders = {b: make_embedder(b, artifact, dtype, max_batch) for b in backends}
            for clip in (float(c) for c in a.clips.split(",")):
                for batch in (int(b) for b in a.batches.split(",")):
                    # Backends one after the other per configuration: a busy spell of a shared
                    # machine then tends to hit both.
                    embeddings = []
                    for backend in backends:
                        result, emb = run(backend, embedders[backend], a.size, clip, batch,
                                          dtype, a.repeats, max_batch)
                        results.append(result)
                        embeddings.append(emb)
                        print(json.dumps(result), flush=True)
                    if len(embeddings) > 1:
                        differences[(dtype, clip, batch)] = float(max(
                            np.abs(e - embeddings[0]).max() for e in embeddings[1:]))
    summary: dict[str, Any] = {
        "benchmark": "hear_embed", "backends": backends, "jax_backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "jax": jax.__version__,
    }
    if "torch" in backends:
        summary.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    summary.update(
        results=results, side_by_side=side_by_side(results, differences),
        any_recompilation_after_first_call=any(r["recompiled_after_first_call"]
                                               for r in results))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
