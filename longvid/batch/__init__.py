"""Batches: prompt manifests and their shards (``longvid batch``; issue in progress).

- ``manifest.py``: text / JSONL / CSV manifests read into items, each resolved into a full recipe with the rules of
  a single run before any model loads (errors carry the file's line number), seeds independent of how the work
  is split;
- ``shards.py``: which items a worker takes: ``--shard i/n``, a SLURM array task or a torchrun rank.
"""
