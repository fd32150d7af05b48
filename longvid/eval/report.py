"""Measure many videos and show the results, for ``longvid metrics PATH... [--json]``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from longvid.errors import Problem, RecipeError
from longvid.eval.frames import DEFAULT_MAX_SIDE, VideoReadError
from longvid.eval.metrics import SCALAR_METRICS, measure_path

_FIX = "pass a video file or a folder of .mp4 files"


def find_videos(paths: list[str]) -> list[Path]:
    """Each path as given, a folder replaced by its ``*.mp4`` files (sorted). Raises ``RecipeError`` naming
    every missing path and every folder without videos."""
    videos: list[Path] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("*.mp4"))
            if not found:
                problems.append(Problem("path", f"folder {raw} holds no .mp4 files: {_FIX}"))
            videos += found
        elif path.is_file():
            videos.append(path)
        else:
            problems.append(Problem("path", f"{raw} does not exist: {_FIX}"))
    if problems:
        raise RecipeError(problems)
    return videos


def measure_paths(paths: list[str], max_side: int = DEFAULT_MAX_SIDE) -> list[dict[str, Any]]:
    """:func:`~longvid.eval.metrics.measure_path` of every video in ``paths`` (folders expand to their ``*.mp4``
    files), in order. A missing path, a file ffmpeg cannot decode or a broken sidecar raises ``RecipeError``."""
    results = []
    for video in find_videos(paths):
        try:
            results.append(measure_path(video, max_side=max_side))
        except VideoReadError as err:
            raise RecipeError([Problem("path", f"{err}: {_FIX}")]) from err
        except ValueError as err:  # too few frames, or a sidecar whose "seams" is not a list of frame indices
            raise RecipeError([Problem("path", f"{video}: {err}")]) from err
    return results


def render_table(results: list[dict[str, Any]]) -> Table:
    """One row per metric, one column per video (named by its file; the full paths are in ``--json``), 3 significant
    digits, "–" where a metric has no value: a dozen metrics read down a column at any terminal width. The
    results' notes (e.g. how to get the flow metrics) become the caption."""
    table = Table()
    table.add_column("metric")
    for result in results:
        table.add_column(Path(result.get("path", "")).name or "video", justify="right", overflow="fold")
    table.add_row("frames", *(str(r["frames"]) for r in results))
    table.add_row("fps", *(_fmt(r["fps"]) for r in results))
    table.add_row("size", *(f"{r['size'][0]}×{r['size'][1]}" for r in results))
    for key in SCALAR_METRICS:
        table.add_row(key, *(_fmt(r[key]) for r in results))
    notes = dict.fromkeys(note for result in results for note in result["notes"])  # unique, in order
    if notes:
        table.caption = "; ".join(notes)
    return table


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}"
