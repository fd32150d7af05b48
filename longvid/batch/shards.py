"""Which items of a manifest a worker takes: shard ``i`` of ``n`` = items ``i, i + n, i + 2n, …``.

The shard comes from ``--shard i/n``, else from SLURM (``SLURM_ARRAY_TASK_ID`` within ``SLURM_ARRAY_TASK_MIN`` …
``SLURM_ARRAY_TASK_MAX``, or ``SLURM_ARRAY_TASK_COUNT``), else from torchrun (``RANK`` / ``WORLD_SIZE``), else the
whole manifest. Shards are disjoint and together cover every item, whatever the item count; an explicit shard
that disagrees with the environment is refused (two ways of splitting the same work would skip or repeat items).
"""

from __future__ import annotations

import os
from typing import Mapping

from longvid.errors import Problem, RecipeError


def parse_shard(text: str) -> tuple[int, int]:
    """``"3/16"`` -> (3, 16): shard 3 of 16 (0-based)."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit() or int(count) < 1 \
            or int(index) >= int(count):
        raise RecipeError([Problem("--shard", f"expected I/N with 0 <= I < N (e.g. 3/16), got {text!r}")])
    return int(index), int(count)


def environment_shard(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard a SLURM array task or a torchrun rank stands for, or None outside both."""
    env = os.environ if env is None else env
    task = env.get("SLURM_ARRAY_TASK_ID")
    if task is not None:
        low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        if "SLURM_ARRAY_TASK_MAX" in env:
            count = int(env["SLURM_ARRAY_TASK_MAX"]) - low + 1
        else:
            count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
        index = int(task) - low
        if not 0 <= index < count:
            raise RecipeError([Problem("SLURM_ARRAY_TASK_ID", f"task {task} is outside the array {low}..{low + count - 1}"
                                       "; submit a contiguous --array")])
        return index, count
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return None


def pick_shard(explicit: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """The shard of this worker: ``explicit`` (``--shard``) or the environment's, which must agree when both exist."""
    from_env = environment_shard(env)
    if explicit is None:
        return from_env or (0, 1)
    shard = parse_shard(explicit)
    if from_env is not None and from_env != shard:
        raise RecipeError([Problem("--shard", f"--shard {shard[0]}/{shard[1]} disagrees with the environment's "
                                              f"{from_env[0]}/{from_env[1]} (SLURM array or torchrun); give one")])
    return shard


def shard_items(count: int, shard: tuple[int, int]) -> list[int]:
    """Indices of the items of ``shard`` among ``count`` items (round-robin: shards stay balanced)."""
    index, n = shard
    return list(range(index, count, n))
