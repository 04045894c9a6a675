"""HEAR embedding throughput: seconds of audio embedded per second, waveform in, embeddings out.

    python benchmarks/hear_embed.py [--size base] [--clips 2,10] [--batches 1,32]
        [--dtypes float32,bfloat16] [--repeats 2] [--max-batch N]

Random weights of the paper's architecture (``mwmae.model_config(size)``), the whole path of
``get_timestamp_embeddings`` (numpy log-mel, normalisation, chunking, the bucketed jitted
encoder, copies back to the host). Per configuration: the first call (compiles), then the best
of ``--repeats`` timed calls, and whether any call after the first traced the encoder again
(it must not: the chunk batches fall into buckets compiled on the first call). Prints JSON.
On a shared machine the figures vary by tens of percent; compare runs of one session.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

import mwmae
from mwmae.api import Model
from mwmae.hear.embed import Embedder, max_batch_default, padded_chunk_count
from mwmae.model import init_params


def run(size: str, clip_s: float, batch: int, dtype: str, repeats: int, max_batch: int,
        params) -> dict:
    config = mwmae.model_config(size, dtype=dtype)
    embedder = Embedder(Model(config, params), max_batch=max_batch)
    rng = np.random.default_rng(0)
    wav = rng.uniform(-0.5, 0.5, (batch, int(clip_s * 16000))).astype(np.float32)
    t0 = time.perf_counter()
    embedder.timestamp_embeddings(wav)
    first = time.perf_counter() - t0
    traces_after_first = embedder.traces
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb, _ = embedder.timestamp_embeddings(wav)
        times.append(time.perf_counter() - t0)
    best = min(times)
    audio_s = batch * clip_s
    return {
        "size": size, "clip_seconds": clip_s, "batch": batch, "dtype": dtype,
        "chunks": batch * padded_chunk_count(wav.shape[1]), "max_batch": max_batch,
        "first_call_seconds": round(first, 3), "seconds": round(best, 3),
        "audio_seconds_per_second": round(audio_s / best, 2),
        "recompiled_after_first_call": embedder.traces != traces_after_first,
        "encoder_compilations": embedder.traces, "embedding_shape": list(emb.shape),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--clips", default="2,10", help="clip lengths in seconds")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=0, help="chunks per encoder call "
                   "(default: 8 on CPU, 128 on accelerators)")
    a = p.parse_args(argv)
    max_batch = a.max_batch or max_batch_default()
    params = init_params(mwmae.model_config(a.size), jax.random.key(0))
    results = []
    for dtype in a.dtypes.split(","):
        for clip in (float(c) for c in a.clips.split(",")):
            for batch in (int(b) for b in a.batches.split(",")):
                results.append(run(a.size, clip, batch, dtype, a.repeats, max_batch, params))
                print(json.dumps(results[-1]), flush=True)
    summary = {
        "benchmark": "hear_embed", "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "jax": jax.__version__, "results": results,
        "any_recompilation_after_first_call": any(r["recompiled_after_first_call"]
                                                  for r in results),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
