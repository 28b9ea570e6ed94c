"""The shard format, in one place: names and version, the writer, the reader and the manifest checks.

A shard directory holds ``manifest.json``, the tokenizer and the shards ``<split>-<index>.tar``
(webdataset tars of chunks of consecutive samples, one zstd-compressed ``.npy`` member per column).
docs/data-format.md describes every column.  Everything that writes, reads or checks shards
(data_prep's builder, ``verify`` / ``stats`` / ``inspect`` / ``convert``, pretrain's loader) goes
through the names below:

* ``format``: version, file, sample and member names, the columns of a chunk, ``shard_path``;
* ``writer``: ``ShardWriter`` (batches of columns in, chunks out);
* ``reader``: ``decode_shard`` (a whole shard's bytes -> ``DecodedShard``, checked), ``wds_samples``
  (stock webdataset's chunks -> samples), ``iter_split_samples``;
* ``schema``: ``parse_manifest`` / ``read_manifest`` (every field checked) and ``split_info``.
"""
from data_prep.shards.format import (CHUNK_SAMPLES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, SENTENCE_LABEL_KEYS,
                                     SHARD_NAME, SPLIT_CODES, SPLITS, ZSTD_LEVEL, column_dtype, parse_key,
                                     sample_columns, sample_key, shard_name, shard_path)
from data_prep.shards.reader import (DecodedShard, decode_shard, iter_split_samples, iter_split_shards, read_entry,
                                     wds_samples)
from data_prep.shards.schema import parse_manifest, read_manifest, split_info
from data_prep.shards.writer import ShardWriter

__all__ = ["CHUNK_SAMPLES", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "SENTENCE_LABEL_KEYS", "SHARD_NAME",
           "SPLIT_CODES", "SPLITS", "ZSTD_LEVEL", "DecodedShard", "ShardWriter", "column_dtype", "decode_shard",
           "iter_split_samples", "iter_split_shards", "parse_key", "parse_manifest", "read_entry", "read_manifest", "sample_columns",
           "sample_key", "shard_name", "shard_path", "split_info", "wds_samples"]
