"""``longvid compare``: the same prompt and seed through several recipes (or existing videos), side by side.

:func:`generate_all` runs N recipes with one prompt and seed, loading each model once for every recipe that
shares its load key (like a batch worker), and skipping a video whose sidecar already holds that recipe.
:func:`write_report` turns any list of videos into a static folder that works offline (no CDN, no server):

- ``index.html``: synchronized players (play, pause and seek together), the metrics table, time and peak memory
  from the sidecars, contact sheets, the per-frame plot and every resolved recipe;
- ``side-by-side.mp4``: the videos stacked left to right (a shorter one holds its last frame);
- ``sheets/<label>.png``: every k-th frame of each video; ``plots/per-frame.png`` (matplotlib, the ``plots``
  extra; without it the page says so); ``metrics.json``: every number on the page.

All user text (prompts, paths, recipe values) is escaped into the page; nothing is ever evaluated.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from longvid.errors import Problem, RecipeError

SHEET_FRAMES = 8  # frames per contact sheet (every k-th frame, k = frames // 8)
SHEET_SIDE = 192  # longer side of a contact-sheet thumbnail
STACK_SIDE = 512  # longer side of each video in the side-by-side MP4


@dataclass
class Entry:
    """One video of a comparison: its label on the page and what its sidecar says (when it has one)."""

    label: str
    path: Path
    sidecar: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ inputs


def labels_for(names: list[str]) -> list[str]:
    """File-safe, unique labels: a recipe path's stem, characters outside ``[A-Za-z0-9._-]`` as ``-``, repeats
    numbered (``x``, ``x-2``)."""
    labels: list[str] = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).stem if name.endswith((".yaml", ".yml", ".json")) else
                      Path(name).name).strip("-.") or "video"
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base}-{n}"
        labels.append(label)
    return labels


def find_videos(paths: list[str]) -> list[Path]:
    """``--videos``: files, or folders (a batch folder) standing for their ``*.mp4`` files, sorted."""
    from longvid.eval.report import find_videos as expand

    videos = expand(paths)
    if len(videos) < 1:
        raise RecipeError([Problem("--videos", "name at least one video or a folder of .mp4 files")])
    return videos


def resolve_recipes(names: list[str], overrides: list[str], options: dict[str, Any], videos_dir: Path,
                    interpolate: bool = False) -> list[tuple[str, Any]]:
    """Every recipe resolved with the shared prompt, seed and overrides, named by its label, before anything loads;
    all problems come back together, each prefixed with the recipe it belongs to."""
    from longvid.recipe.resolve import resolve

    resolved, problems = [], []
    for name, label in zip(names, labels_for(names)):
        try:
            recipe = resolve(name, overrides, {**options, "output.dir": str(videos_dir), "output.name": label},
                             interpolate=interpolate)
        except RecipeError as err:
            problems += [Problem(f"{label}: {p.key}" if p.key else label, p.message) for p in err.problems]
            continue
        resolved.append((label, recipe))
    if problems:
        raise RecipeError(problems)
    return resolved


def generate_all(recipes: list[tuple[str, Any]], progress: Callable | None = None,
                 on_video: Callable[[str, Path, bool], None] | None = None) -> list[Entry]:
    """Generate each ``(label, recipe)``; one model load per load key (in the order given). A video whose sidecar
    already holds its recipe is kept (``on_video(label, path, reused=True)``)."""
    from longvid import runner
    from longvid.batch.worker import is_done
    from longvid.models.base import load_key

    groups: dict[str, list[tuple[str, Any]]] = {}
    for label, recipe in recipes:
        groups.setdefault(json.dumps(load_key(recipe), sort_keys=True), []).append((label, recipe))
    paths: dict[str, Path] = {}
    for group in groups.values():
        adapter = None
        try:
            for label, recipe in group:
                path = runner.planned_output(recipe)
                reused = is_done(path, recipe)
                if not reused:
                    recipe.output.overwrite = True  # a leftover of another recipe under this label: replace it
                    adapter = adapter or runner.load_adapter(recipe)
                    path = runner.generate(recipe, adapter=adapter, progress=progress).path
                paths[label] = path
                if on_video is not None:
                    on_video(label, path, reused)
        finally:
            if adapter is not None:
                adapter.close()
    return [Entry(label, paths[label], _sidecar(paths[label])) for label, _ in recipes]


def entries_for(videos: list[Path]) -> list[Entry]:
    """Existing videos as entries; each must decode and hold at least 2 frames (checked before anything is
    written)."""
    import imageio_ffmpeg

    problems = []
    for video in videos:
        try:
            frames = imageio_ffmpeg.count_frames_and_secs(str(video))[0]
        except (RuntimeError, OSError) as err:
            problems.append(Problem("--videos", f"{video}: not a video ffmpeg can read ({' '.join(str(err).split())[:200]})"))
            continue
        if frames < 2:
            problems.append(Problem("--videos", f"{video}: {frames} frame(s); a comparison needs at least 2"))
    if problems:
        raise RecipeError(problems)
    return [Entry(label, path, _sidecar(path)) for label, path in zip(labels_for([str(v) for v in videos]), videos)]


def _sidecar(video: Path) -> dict[str, Any]:
    """What the page shows from a video's sidecar: only a longvid sidecar's keys, each of the expected type (an
    ``x.json`` of another program, or a hand-edited one, gives nothing rather than a wrong page or a crash)."""
    from longvid.io.sidecar import sidecar_path

    try:
        data = json.loads(sidecar_path(video).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or "longvid_sidecar" not in data:
        return {}
    kept: dict[str, Any] = {k: data[k] for k in ("recipe", "timings", "peak_memory") if isinstance(data.get(k), dict)}
    if isinstance(data.get("seed"), int):
        kept["seed"] = data["seed"]
    seams = data.get("seams")
    if isinstance(seams, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in seams):
        kept["seams"] = seams
    return kept


# ------------------------------------------------------------------------------------------------ report


def write_report(entries: list[Entry], out_dir: Path, title: str = "longvid compare") -> Path:
    """Write the comparison folder for ``entries``; returns ``index.html``. Videos outside ``out_dir/videos``
    are copied there, so the folder stands alone."""
    from longvid.eval.metrics import measure_path

    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("videos", "sheets", "plots"):
        (out_dir / sub).mkdir(exist_ok=True)
    for e in entries:
        local = out_dir / "videos" / f"{e.label}.mp4"
        if e.path.resolve() != local.resolve():
            _copy_atomic(e.path, local)
        e.path = local
    series = {e.label: _sheet_and_series(e.path, out_dir / "sheets" / f"{e.label}.png") for e in entries}
    # the seams come from the entry's own sidecar: a copied video has none beside it
    metrics = {e.label: measure_path(e.path, seams=e.sidecar.get("seams")) for e in entries}
    _stack(entries, out_dir / "side-by-side.mp4")
    plot = _plot(series, out_dir / "plots" / "per-frame.png")
    data = {"title": title, "videos": [{"label": e.label, "video": f"videos/{e.label}.mp4",
                                        "metrics": metrics[e.label], "timings": e.sidecar.get("timings"),
                                        "peak_memory": e.sidecar.get("peak_memory"),
                                        "recipe": e.sidecar.get("recipe"), "per_frame": series[e.label]}
                                       for e in entries]}
    _write_text(out_dir / "metrics.json", json.dumps(data, indent=2))
    page = out_dir / "index.html"
    _write_text(page, _page(entries, metrics, plot, title))
    return page


def contact_sheet(video: Path, sheet: Path) -> None:
    """Write ``sheet`` (PNG): every k-th frame of ``video`` (k = frames // 8), four per row (``output.preview``)."""
    _sheet_and_series(video, sheet)


def _sheet_and_series(video: Path, sheet: Path) -> dict[str, list[float]]:
    """One pass over the video: the contact sheet (every k-th frame, 4 per row) and per-frame luma and
    difference to the previous frame (0..1), for the plot."""
    from longvid.eval.frames import open_frames

    luma, diff, picked = [], [], []
    count = _frame_count(video)
    every = max(1, count // SHEET_FRAMES)
    with open_frames(video, max_side=SHEET_SIDE) as frames:
        previous = None
        for i, frame in enumerate(frames):  # (h, w, 3) uint8
            grey = frame.astype(np.float32).mean(axis=2) / 255.0  # (h, w)
            luma.append(float(grey.mean()))
            diff.append(float(np.abs(grey - previous).mean()) if previous is not None else 0.0)
            previous = grey
            if i % every == 0 and len(picked) < SHEET_FRAMES:
                picked.append(frame)
    if picked:
        write_png(sheet, _grid(picked, columns=4))
    return {"luma": luma, "diff": diff}


def _frame_count(video: Path) -> int:
    import imageio_ffmpeg

    try:
        return imageio_ffmpeg.count_frames_and_secs(str(video))[0]
    except (RuntimeError, OSError):
        return SHEET_FRAMES


def _grid(frames: list[np.ndarray], columns: int) -> np.ndarray:
    """Frames ``(h, w, 3)`` tiled row by row with a 4-px dark gap: ``(rows·(h+4)−4, cols·(w+4)−4, 3)``."""
    h, w, _ = frames[0].shape
    rows = -(-len(frames) // columns)
    cols = min(columns, len(frames))
    sheet = np.full((rows * (h + 4) - 4, cols * (w + 4) - 4, 3), 24, np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, columns)
        sheet[r * (h + 4): r * (h + 4) + h, c * (w + 4): c * (w + 4) + w] = f
    return sheet


def write_png(path: Path, rgb: np.ndarray) -> None:
    """A uint8 ``(H, W, 3)`` image as PNG through the bundled ffmpeg (no imaging library needed), atomically."""
    import imageio_ffmpeg

    from longvid.io.paths import create_exclusive, partial_path, remove_quietly

    tmp = partial_path(path.with_suffix(".png"))
    os.close(create_exclusive(tmp))  # ours, a regular file (no planted link): ffmpeg writes into it
    writer = imageio_ffmpeg.write_frames(str(tmp), (rgb.shape[1], rgb.shape[0]), codec="png", pix_fmt_out="rgb24",
                                         macro_block_size=1, ffmpeg_log_level="error",
                                         output_params=["-frames:v", "1", "-update", "1"])
    try:
        writer.send(None)
        writer.send(np.ascontiguousarray(rgb))
        writer.close()
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


def _stack(entries: list[Entry], target: Path) -> None:
    """``side-by-side.mp4``: the videos read in lockstep, each scaled to fit ``STACK_SIDE``, padded to the
    tallest, placed left to right; a video that ends holds its last frame until the longest ends."""
    from longvid.eval.frames import open_frames
    from longvid.io.video import VideoWriter

    readers = [open_frames(e.path, max_side=STACK_SIDE) for e in entries]
    try:
        iters = [iter(r) for r in readers]
        height = max(r.analysed_size[1] for r in readers)
        last: list[np.ndarray | None] = [None] * len(readers)
        with VideoWriter(target, fps=readers[0].fps or 16, overwrite=True) as writer:
            while True:
                fresh = False
                for i, it in enumerate(iters):
                    frame = next(it, None)
                    if frame is not None:
                        last[i], fresh = frame, True
                if not fresh:
                    break
                tiles = [np.pad(f, ((0, height - f.shape[0]), (0, 0), (0, 0))) for f in last if f is not None]
                writer.write(np.concatenate(tiles, axis=1)[None])  # (1, height, sum of widths, 3)
    finally:
        for r in readers:
            r.close()


def _plot(series: dict[str, dict[str, list[float]]], target: Path) -> Path | None:
    """Per-frame luma and frame difference of every video (matplotlib; None when it is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    for label, s in series.items():
        top.plot(s["luma"], label=label)
        bottom.plot(s["diff"], label=label)
    top.set_ylabel("mean luma (0..1)")
    bottom.set_ylabel("|frame − previous| (0..1)")
    bottom.set_xlabel("frame")
    top.legend(fontsize=8)
    fig.tight_layout()
    from longvid.io.paths import replace_atomically

    try:
        replace_atomically(target, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return target


def _copy_atomic(src: Path, dst: Path) -> None:
    from longvid.io.paths import replace_atomically

    def copy(tmp: Path) -> None:
        with open(src, "rb") as f, open(tmp, "wb") as g:  # tmp: our exclusive temporary, a regular file
            shutil.copyfileobj(f, g)

    replace_atomically(dst, copy)


def _write_text(path: Path, text: str) -> None:
    from longvid.io.paths import write_text_atomically

    write_text_atomically(path, text)


# ------------------------------------------------------------------------------------------------ the page


def _fmt(value: Any) -> str:
    if value is None or value == []:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _peak(peak: dict[str, Any] | None) -> str:
    if not peak:
        return "–"
    value = peak.get("cuda_max_allocated_bytes", peak.get("peak_rss_bytes"))
    kind = "GPU" if "cuda_max_allocated_bytes" in peak else f"RSS, {peak.get('peak_rss_scope', 'process')}"
    return f"{value / 2**30:.2f} GiB ({kind})" if isinstance(value, (int, float)) else "–"


def _page(entries: list[Entry], metrics: dict[str, dict], plot: Path | None, title: str) -> str:
    from longvid.eval.metrics import SCALAR_METRICS

    e_ = html.escape
    prompt = next((e.sidecar.get("recipe", {}).get("prompt") for e in entries if e.sidecar.get("recipe")), None)
    seed = next((e.sidecar.get("seed") for e in entries if "seed" in e.sidecar), None)
    head = [f"<th>{e_(e.label)}</th>" for e in entries]
    players = "\n".join(
        f'<figure><video src="videos/{e_(e.label)}.mp4" muted playsinline preload="auto" '
        f'data-label="{e_(e.label)}"></video><figcaption>{e_(e.label)}</figcaption></figure>' for e in entries)
    metric_rows = "\n".join(
        f"<tr><td>{key}</td>" + "".join(f"<td>{e_(_fmt(metrics[e.label][key]))}</td>" for e in entries) + "</tr>"
        for key in ("frames", "fps", *SCALAR_METRICS))
    cost_rows = "\n".join(
        f"<tr><td>{name}</td>" + "".join(f"<td>{e_(cell(e))}</td>" for e in entries) + "</tr>" for name, cell in (
            ("total s", lambda e: _fmt((e.sidecar.get("timings") or {}).get("total_s"))),
            ("denoise s", lambda e: _fmt((e.sidecar.get("timings") or {}).get("denoise_s"))),
            ("peak memory", lambda e: _peak(e.sidecar.get("peak_memory"))),
            ("seams", lambda e: _fmt(e.sidecar.get("seams")))))
    sheets = "\n".join(f'<figure><img src="sheets/{e_(e.label)}.png" alt="contact sheet of {e_(e.label)}">'
                       f"<figcaption>{e_(e.label)}</figcaption></figure>" for e in entries)
    recipes = "\n".join(f"<details><summary>{e_(e.label)}</summary><pre>"
                        f"{e_(json.dumps(e.sidecar.get('recipe'), indent=2, ensure_ascii=False))}</pre></details>"
                        for e in entries)
    plot_html = ('<img src="plots/per-frame.png" alt="per-frame luma and frame difference">' if plot else
                 "<p>The per-frame plot needs matplotlib: pip install 'longvid[plots]'.</p>")
    notes = sorted({n for m in metrics.values() for n in m.get("notes", [])})
    about = " · ".join(x for x in (f"prompt: {e_(_prompt_text(prompt))}" if prompt is not None else "",
                                   f"seed: {e_(str(seed))}" if seed is not None else "") if x)
    return _TEMPLATE.format(
        title=e_(title), about=about, players=players, head="".join(head), metric_rows=metric_rows,
        notes="".join(f"<p class=note>{e_(n)}</p>" for n in notes), cost_rows=cost_rows, sheets=sheets,
        plot=plot_html, recipes=recipes, script=_SCRIPT)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, dict):
        return "; ".join(f"{k}: {v}" for k, v in prompt.items())
    return str(prompt)


_SCRIPT = """
// One clock for every player: play/pause/seek drive all videos; the first video is the reference and the
// others are pulled back to it when they drift by more than a frame or two.
const videos = Array.from(document.querySelectorAll('video'));
const play = document.getElementById('play');
const seek = document.getElementById('seek');
const clock = document.getElementById('clock');
const longest = () => Math.max(...videos.map(v => v.duration || 0));
function setTime(t) { for (const v of videos) v.currentTime = Math.min(t, Math.max(0, (v.duration || 0) - 1e-3)); }
function playAll() { setTime(videos[0].currentTime); return Promise.all(videos.map(v => v.play())); }
function pauseAll() { for (const v of videos) v.pause(); }
play.addEventListener('click', () => {
  if (videos[0].paused) { playAll(); play.textContent = 'pause'; } else { pauseAll(); play.textContent = 'play'; }
});
seek.addEventListener('input', () => setTime(seek.value / 1000 * longest()));
videos[0].addEventListener('timeupdate', () => {
  const t = videos[0].currentTime;
  clock.textContent = t.toFixed(2) + ' s';
  if (longest() > 0) seek.value = Math.round(t / longest() * 1000);
  for (const v of videos.slice(1)) {
    if (!v.paused && !v.ended && Math.abs(v.currentTime - t) > 0.1 && t < v.duration) v.currentTime = t;
  }
});
videos[0].addEventListener('ended', () => { pauseAll(); play.textContent = 'play'; });
"""

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }}
.players, .sheets {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; }} video, img {{ max-width: 100%; display: block; background: #000; }}
.players video {{ width: 320px; }} figcaption {{ font-weight: 600; margin-top: 4px; }}
#controls {{ margin: 10px 0; display: flex; gap: 10px; align-items: center; }} #seek {{ width: 420px; }}
table {{ border-collapse: collapse; margin: 8px 0; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
td:not(:first-child) {{ text-align: right; font-variant-numeric: tabular-nums; }}
pre {{ background: #f0f0f0; padding: 8px; overflow: auto; max-height: 30em; }} .note {{ color: #a60; }}
</style></head><body>
<h1>{title}</h1>
<p>{about}</p>
<div id="controls"><button id="play">play</button><input id="seek" type="range" min="0" max="1000" value="0">
<span id="clock">0.00 s</span></div>
<div class="players">
{players}
</div>
<h2>Metrics</h2>
<p>What each metric detects: docs/metrics.md. Side by side as one video: <a href="side-by-side.mp4">side-by-side.mp4</a>;
every number: <a href="metrics.json">metrics.json</a>.</p>
<table id="metrics"><tr><th>metric</th>{head}</tr>
{metric_rows}
</table>
{notes}
<h2>Time and memory</h2>
<table id="costs"><tr><th></th>{head}</tr>
{cost_rows}
</table>
<h2>Contact sheets</h2>
<div class="sheets">
{sheets}
</div>
<h2>Per frame</h2>
{plot}
<h2>Recipes</h2>
{recipes}
<script>{script}</script>
</body></html>
"""
