"""The shard format, in one place: names and version, the writer, the reader and the manifest checks.

A shard directory holds ``manifest.json``, the tokenizer and the shards ``<split>-<index>.tar``
(webdataset tars, one ``.npy`` / ``.cls`` member per field of a sample).  docs/data-format.md
describes every field.  Everything that writes, reads or checks shards (data_prep's builder,
``verify`` / ``stats`` / ``inspect``, pretrain's loader) goes through the names below:

* ``format``: version, file and sample names, the members of a sample, ``shard_path``;
* ``writer``: ``ShardWriter`` and the npy/byte rows it takes (same bytes as stdlib tarfile);
* ``reader``: a shard checked against its manifest entry, indexed, read and decoded by sample;
* ``schema``: ``read_manifest`` (every field checked) and ``split_info``.
"""
from data_prep.shards.format import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, SENTENCE_LABEL_KEYS, SHARD_NAME,
                                     SPLIT_CODES, SPLITS, parse_key, sample_fields, sample_key, shard_name, shard_path)
from data_prep.shards.reader import (decode_fields, index_shard, iter_split_samples, iter_tar_samples, read_members,
                                     shard_file_problem)
from data_prep.shards.schema import read_manifest, split_info
from data_prep.shards.writer import ShardWriter, bytes_rows, npy_bytes, npy_rows

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "SENTENCE_LABEL_KEYS", "SHARD_NAME", "SPLIT_CODES", "SPLITS",
           "ShardWriter", "bytes_rows", "decode_fields", "index_shard", "iter_split_samples",
           "iter_tar_samples", "npy_bytes", "npy_rows", "parse_key", "read_manifest", "read_members", "sample_fields",
           "sample_key", "shard_file_problem", "shard_name", "shard_path", "split_info"]
