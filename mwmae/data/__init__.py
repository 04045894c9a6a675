"""Log-mel shards in, globally sharded training batches out (local disk or gs://)."""

from mwmae.data.global_batch import to_global
from mwmae.data.pipeline import (
    InputIterator,
    PipelineConfig,
    host_dataset,
    make_input_iterator,
)
from mwmae.data.records import RecordError, decode_example, encode_example
from mwmae.data.shard_set import ShardSet
from mwmae.data.shards import Shard, for_host, read_manifest, resolve

__all__ = [
    "InputIterator",
    "PipelineConfig",
    "RecordError",
    "Shard",
    "ShardSet",
    "decode_example",
    "encode_example",
    "for_host",
    "host_dataset",
    "make_input_iterator",
    "read_manifest",
    "resolve",
    "to_global",
]
