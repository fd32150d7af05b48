"""Prompt manifests: one video per item, every item a full recipe checked before any model loads.

Formats, by file suffix:

- ``.txt``: one prompt per non-empty line (a line starting with ``#`` is a comment; write such a prompt in JSONL);
- ``.jsonl``: one JSON object per line with ``prompt`` (text, or ``{frame: text}`` keyframes), and optionally
  ``negative_prompt``, ``seed``, ``name``, ``image`` and ``overrides`` (``{"video.num_frames": 161}`` or
  ``["video.num_frames=161"]``);
- ``.csv``: a header row; columns ``prompt``, ``negative_prompt``, ``seed``, ``name``, ``image``, and any recipe key
  (``video.num_frames``) as a per-item override.

An item's seed is the one it gives, else the recipe's seed plus the item's index — never the worker's rank or
shard, so a video does not depend on how the batch is split. Its output name is its own ``name`` or the batch's
template, where ``{index}`` is the item's index. Every item is resolved exactly as a single run would be (free text
is never evaluated); problems come back together, each as ``file:line: key: message``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longvid.errors import Problem, RecipeError

ITEM_KEYS = ("prompt", "negative_prompt", "seed", "name", "image", "overrides")
DEFAULT_NAME = "{index:05d}-{prompt}-{seed}"
_INDEX = re.compile(r"\{index(?::([^{}]*))?\}")


@dataclass
class Item:
    """One manifest entry: where it came from, and its resolved recipe."""

    index: int
    line: int
    recipe: Any


def read_items(path: Path) -> list[tuple[int, dict]]:
    """``[(line number, raw item)]`` of a manifest (see the module docstring for the formats)."""
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise RecipeError([Problem(f"{path.name}:{number}", f"not valid JSON ({err.msg})")]) from None
            if not isinstance(obj, dict):
                raise RecipeError([Problem(f"{path.name}:{number}", "expected a JSON object {\"prompt\": ...}")])
            items.append((number, obj))
        return items
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise RecipeError([Problem(f"{path.name}:1", "a CSV manifest needs a header row with a 'prompt' column")])
        items = []
        for row in reader:
            item = {k: v for k, v in row.items() if k in ITEM_KEYS and v not in (None, "")}
            overrides = {k: v for k, v in row.items() if k not in ITEM_KEYS and k is not None and v not in (None, "")}
            if overrides:
                item["overrides"] = [f"{k}={v}" for k, v in overrides.items()]
            if "seed" in item:
                item["seed"] = _int(item["seed"], f"{path.name}:{reader.line_num}")
            items.append((reader.line_num, item))
        return items
    return [(number, {"prompt": line.strip()}) for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _int(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RecipeError([Problem(where, f"seed: expected an integer, got {value!r}")]) from None


def name_for(template: str, index: int) -> str:
    """``template`` with ``{index}`` (any format spec) filled in; the other fields are left for the run."""
    return _INDEX.sub(lambda m: format(index, m.group(1) or ""), template)


def resolve_items(path: Path, recipe: Any, overrides: list[str] | None = None, name: str | None = None,
                  interpolate: bool = False) -> list[Item]:
    """Every item of the manifest at ``path`` as a resolved recipe; raises one :class:`RecipeError` listing every
    bad item (``file:line: key: message``) before anything runs."""
    from longvid.recipe.resolve import resolve

    if not path.is_file():
        raise RecipeError([Problem("manifest", f"no manifest file '{path}'")])
    base = resolve(recipe, overrides or [], interpolate=interpolate)
    # a `seed=` override sets the base seed (in base.seed); per item it would beat the item's own seed option
    shared = [o for o in overrides or [] if o.partition("=")[0].strip() != "seed"]
    template = name or DEFAULT_NAME
    items, problems = [], []
    for index, (line, raw) in enumerate(read_items(path)):
        where = f"{path.name}:{line}"
        unknown = sorted(set(raw) - set(ITEM_KEYS))
        if unknown:
            problems.append(Problem(where, f"unknown item key(s) {unknown}; known: {', '.join(ITEM_KEYS)}"))
            continue
        extra = raw.get("overrides") or []
        if isinstance(extra, dict):
            extra = [f"{k}={json.dumps(v)}" for k, v in extra.items()]
        if not isinstance(extra, list) or not all(isinstance(o, str) for o in extra):
            problems.append(Problem(where, "overrides: a {key: value} object or a list of \"key=value\" strings"))
            continue
        seed = raw.get("seed", base.seed + index)
        options = {"prompt": raw.get("prompt"), "negative_prompt": raw.get("negative_prompt"), "seed": seed,
                   "image": raw.get("image"), "output.name": name_for(str(raw.get("name") or template), index)}
        if options["prompt"] is None:
            problems.append(Problem(where, "prompt: every item needs a prompt"))
            continue
        try:
            item = resolve(recipe, [*shared, *extra], options, interpolate=interpolate)
        except RecipeError as err:
            problems += [Problem(f"{where}: {p.key}" if p.key else where, p.message) for p in err.problems]
            continue
        items.append(Item(index, line, item))
    if problems:
        raise RecipeError(problems)
    return items
