"""One host of the 2-host metrics test: python finetune_metrics_host.py PORT PROCESS_ID OUT."""

import json
import sys

import jax
import numpy as np

from mwmae.finetune import metrics
from mwmae.finetune.gather import gather_rows


def split_rows(clips: int, hosts: int, host: int) -> np.ndarray:
    """Uneven, interleaved rows of a shuffled split: host h gets a different count."""
    perm = np.random.default_rng(5).permutation(clips)
    cuts = np.linspace(0, clips, hosts + 1).astype(int) + np.arange(hosts + 1) * 7
    cuts[0], cuts[-1] = 0, clips
    return perm[cuts[host]:cuts[host + 1]]


def main() -> None:
    port, host, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    hosts = 2 if port else 1
    if port:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=host)
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_finetune_metrics import fixed_split

    labels, scores = fixed_split(seed=3)
    rows = split_rows(labels.shape[0], hosts, host)
    # Ids past 2**32 (as the evaluation's shard << 32 | record) and float64 scores that float32
    # cannot hold: the gather must carry both bit for bit.
    ids, got_labels, got_scores = gather_rows(rows.astype(np.int64) << 32, labels[rows],
                                              scores[rows] + 1e-9 * np.pi)
    ids = ids >> 32
    result = {k: float(v).hex() for k, v in metrics.multilabel(got_labels, got_scores).items()}
    result["rows"] = int(rows.size)
    result["ids"] = ids.tolist()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
