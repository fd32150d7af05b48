"""The ``longvid`` command line: thin Typer commands over :mod:`longvid.recipe` and :mod:`longvid.runner`.

Heavy imports (torch, diffusers) happen only inside the commands that run a model, so ``show``,
``validate``, ``recipes``, ``models`` and ``methods`` answer instantly. Every user error is one line on
stderr and exit code 2; ``LONGVID_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup
from rich.markup import escape

from longvid.errors import LongvidError, Problem, RecipeError

class _OneLineErrors(TyperGroup):
    """Command-line usage errors (a bad ``--seed``, an unknown option or command) as one ``error:`` line with
    exit code 2, like every other bad input, instead of Click's usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except typer.exceptions.TyperException as e:  # Click's usage errors (typer vendors Click)
            if not standalone_mode:
                raise
            message = " ".join((e.format_message() if hasattr(e, "format_message") else str(e)).split())
            if message:  # (no arguments at all: the help was printed)
                err.print(f"error: {message}")
            sys.exit(getattr(e, "exit_code", 2))
        except typer.Abort:
            if not standalone_mode:
                raise
            _interrupted_handled()
            sys.exit(130)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


def _interrupted_handled() -> None:
    """Say that Ctrl-C stopped the run, and make sure the exit code stays 130.

    CPython remembers a KeyboardInterrupt that surfaced through any ``exec`` of a string (dataclasses build their
    ``__init__`` that way while torch imports) as "unhandled", even once caught, and then ends the process by
    re-raising SIGINT (exit -2) instead of the code asked for. Evaluating a constant resets that record."""
    err.print("interrupted; no partial output was kept")
    exec("pass", {})  # resets CPython's unhandled-KeyboardInterrupt record (see above); evaluates no user text


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Long and high-resolution video generation with existing video diffusion models.")


def _version(value: bool) -> None:
    if value:
        from longvid import __version__

        print(f"longvid {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Long and high-resolution video generation with existing video diffusion models."""
# No markup or emoji codes: printed text holds user text (prompts, paths) that "[x]" or ":fire:" must not alter;
# soft_wrap: a long path is never folded or cropped to the terminal (or 80 columns in a log file).
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)

RecipeArg = Annotated[str, typer.Option("--recipe", "-r", help="Built-in recipe name, a YAML path or a sidecar.")]
InterpolateOpt = Annotated[bool, typer.Option("--interpolate", help="Evaluate OmegaConf interpolations (${...}) in "
                                                                    "recipe values; prompts are never evaluated.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. video.num_frames=81.",
                                                          show_default=False)]


def friendly(fn):
    """Print a ``LongvidError`` as one line and exit 2 (traceback with LONGVID_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LongvidError as e:
            if os.environ.get("LONGVID_DEBUG") not in (None, "", "0"):
                raise
            style = "bold red" if e.exit_code == 2 else "bold yellow"
            err.print(f"[{style}]{e.label}:[/] {escape(str(e))}", markup=True, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _interrupted_handled()
            raise typer.Exit(130) from None

    return wrapper


def _prompt_at(items: list[str] | None) -> dict[int, str] | None:
    """``--prompt-at 0:"a lake" --prompt-at 48:"a storm"`` -> {0: ..., 48: ...}."""
    if not items:
        return None
    prompts = {}
    for item in items:
        frame, sep, text = item.partition(":")
        if not sep or not frame.strip().isdigit() or not text.strip():
            raise RecipeError([Problem("--prompt-at", f"expected FRAME:TEXT like 0:\"a calm lake\", got {item!r}")])
        if int(frame) in prompts:
            raise RecipeError([Problem("--prompt-at", f"frame {int(frame)} is given twice; one prompt per frame")])
        prompts[int(frame)] = text
    return prompts


def _options(prompt, prompt_at, negative, seed, out_dir, name, overwrite, image=None) -> dict[str, Any]:
    if prompt is not None and prompt_at:
        raise RecipeError([Problem("--prompt", "use either --prompt or --prompt-at, not both")])
    return {"prompt": _prompt_at(prompt_at) or prompt, "negative_prompt": negative, "seed": seed,
            "output.dir": out_dir, "output.name": name, "output.overwrite": True if overwrite else None,
            "image": image}


@app.command()
@friendly
def generate(
    recipe: RecipeArg,
    overrides: Overrides = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt (exact text).")] = None,
    prompt_at: Annotated[Optional[list[str]], typer.Option(
        "--prompt-at", help="Multi-prompt keyframe FRAME:TEXT; repeat for each keyframe.")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option("--negative-prompt", "-n")] = None,
    image: Annotated[Optional[str], typer.Option("--image", help="Image-to-video: the first frame (Pyramid Flow).")] \
        = None,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s")] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder (output.dir).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Output name template (output.name).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and shapes; load nothing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sidecar JSON to stdout.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard this output's checkpoint instead of "
                                                            "resuming it.")] = False,
    interpolate: InterpolateOpt = False,
):
    """Generate a video from a recipe.

    \b
    Examples:
      longvid generate --recipe demo
      longvid generate --recipe wan-t2v-1.3b --prompt "a red fox running through snow" --seed 7
      longvid generate --recipe ./my.yaml video.num_frames=81 sampler.steps=30 --out outputs/
      longvid generate --recipe wan-t2v-1.3b runtime.checkpoint=on_signal   # SIGTERM: checkpoint, exit 75

    \b
    Exit codes: 0 done; 2 bad input or a load/run error (one line); 75 stopped by SIGTERM/SIGUSR1 after writing
    a checkpoint (rerun the same command to resume); 130 interrupted by Ctrl-C (nothing kept).
    """
    from longvid.recipe.resolve import resolve, to_yaml

    resolved = resolve(recipe, overrides or [], _options(prompt, prompt_at, negative_prompt, seed, out_dir, name,
                                                         overwrite, image), interpolate=interpolate)
    if dry_run:
        if as_json:
            from longvid.recipe.resolve import to_dict

            print(json.dumps({"recipe": to_dict(resolved), **_shapes(resolved)}, indent=2, ensure_ascii=False))
        else:
            out.print(to_yaml(resolved), end="")
            out.print(_shape_summary(resolved))
        return
    _quiet_libraries()
    from longvid.interrupts import StopRequests

    with StopRequests(immediate=True):  # a SIGTERM while torch and diffusers import: a clean one-line stop
        from longvid.runner import generate as run

    if quiet or as_json:
        result = run(resolved, restart=restart)
    else:
        with _progress() as progress:
            result = run(resolved, progress=progress, restart=restart)
    if as_json:
        print(json.dumps(result.sidecar, indent=2))
    elif not quiet:
        seconds = result.sidecar["timings"]["total_s"]
        err.print(f"wrote {result.path} ({resolved.video.num_frames} frames, {seconds:.1f} s)")
        if resolved.model.path.startswith("tiny:"):
            err.print("note: this video comes from a random-weight demo model; it shows noise, not the prompt")


@app.command()
@friendly
def batch(
    manifest: Annotated[str, typer.Argument(help="Prompts: .txt (one per line), .jsonl or .csv.")],
    recipe: RecipeArg,
    overrides: Overrides = None,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Output folder of the batch.")] = "outputs",
    shard: Annotated[Optional[str], typer.Option("--shard", help="I/N: this worker's shard (default: from "
                                                                "SLURM_ARRAY_TASK_ID or torchrun's RANK).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Output name template; {index} is the item's "
                                                              "index.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo items that are already done.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed item.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    interpolate: InterpolateOpt = False,
):
    """Generate one video per manifest item; many workers may share a manifest and a folder (exactly once).

    \b
    Examples:
      longvid batch prompts.txt --recipe freelong-128 --out runs/fox/
      longvid batch prompts.jsonl --recipe freeloc-wan-4x --out runs/x/ --shard 3/16

    \b
    Every item is checked before any model loads (file:line: key: message). Exit codes: 0 every item of the
    shard done or skipped; 1 some item failed (see .<name>.failed.json); 2 bad input; 75 stopped by SIGTERM/SIGUSR1
    with the current item checkpointed, or before an item started (rerun to go on).
    """
    from pathlib import Path

    from longvid.batch.manifest import resolve_items
    from longvid.batch.shards import pick_shard

    from longvid.errors import Stopped
    from longvid.interrupts import StopRequests

    # one stop handler from the start (SLURM's USR1/TERM may come at any time): a stop before the first item
    # exits 75 like one between items, so the array script requeues the task
    with StopRequests() as stop:
        try:
            picked = pick_shard(shard)
            items = resolve_items(Path(manifest), recipe, [*(overrides or []), f"output.dir={json.dumps(out_dir)}"],
                                  name, interpolate=interpolate)
            _quiet_libraries()
            with stop.immediately():  # torch and diffusers import
                from longvid.batch.worker import run
        except Stopped:
            from longvid.io.checkpoint import Checkpointed

            raise Checkpointed(f"{stop.requested}: stopped before the first item, nothing was lost; rerun the same "
                               "command to go on") from None
        _run_batch(run, items, picked, out_dir, manifest, force, fail_fast, quiet, stop)


def _run_batch(run, items, picked, out_dir, manifest, force, fail_fast, quiet, stop) -> None:
    from pathlib import Path

    from longvid.batch.shards import shard_items

    if quiet:
        results = run(items, picked, Path(out_dir), Path(manifest), force=force, fail_fast=fail_fast, stop=stop)
    else:
        with _progress() as progress:
            total, seen = len(shard_items(len(items), picked)), []
            progress("items", 0, total)

            def report(result) -> None:
                seen.append(result)
                detail = f" ({result.error})" if result.error else ""
                progress.print(f"[{result.index}] {result.status}: {Path(result.output).name}{detail}")
                progress("items", len(seen), total)

            results = run(items, picked, Path(out_dir), Path(manifest), force=force, fail_fast=fail_fast,
                          progress=progress, on_item=report, stop=stop)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "busy", "failed")}
    err.print(f"shard {picked[0]}/{picked[1]}: {len(results)} items: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if not quiet and results:
        err.print(_batch_summary(results))
    if counts["failed"]:
        raise typer.Exit(1)


def _batch_summary(results) -> Any:
    """The end-of-batch table: per status, how many items, their generation time and peak memory."""
    from statistics import median

    from rich.table import Table

    table = Table(title="batch summary", title_justify="left")
    for column in ("status", "items", "median s/item", "total s", "max peak GiB"):
        table.add_column(column, justify="left" if column == "status" else "right")
    for state in ("done", "failed", "skipped", "busy"):
        mine = [r for r in results if r.status == state]
        if not mine:
            continue
        timed = [r.seconds for r in mine if r.seconds]
        peaks = [r.peak_memory_bytes for r in mine if r.peak_memory_bytes]
        table.add_row(state, str(len(mine)), f"{median(timed):.2f}" if timed else "-",
                      f"{sum(timed):.1f}" if timed else "-", f"{max(peaks) / 2**30:.2f}" if peaks else "-")
    loads = sum(r.load_s for r in results)
    table.caption = f"model loads: {loads:.1f} s"
    return table


@app.command()
@friendly
def status(folder: Annotated[str, typer.Argument(help="A batch output folder.")],
           as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False):
    """Done / running / failed / left items of a batch folder (reads its plan, sidecars, claims, logs), with the
    items per hour so far and the time left at that rate while workers run."""
    from datetime import timedelta
    from pathlib import Path

    from longvid.batch.worker import status as batch_status

    try:
        counts = batch_status(Path(folder))
    except FileNotFoundError as e:
        raise RecipeError([Problem("folder", str(e))]) from None
    if as_json:
        print(json.dumps(counts))
        return
    rate, eta = counts.pop("items_per_hour"), counts.pop("eta_s")
    line = " ".join(f"{k} {v}" for k, v in counts.items())
    line += f" items/h {rate:g}" if rate else " items/h -"
    line += f" eta {timedelta(seconds=eta)}" if eta is not None else " eta -"
    out.print(line)


@app.command()
@friendly
def metrics(
    paths: Annotated[list[str], typer.Argument(help="Videos, or folders of .mp4 files (batch outputs too).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print every metric of every video as JSON.")] = False,
    max_side: Annotated[int, typer.Option("--max-side", help="Analyse frames downscaled to this longer side.")] = 256,
):
    """Weight-free quality metrics: motion, flicker, warp error, seams, sharpness and colour drift, repetition.

    \b
    Examples:
      longvid metrics runs/fox/fox-128.mp4
      longvid metrics runs/fox/ --json > m.json

    \b
    Seams are measured at the window boundaries a run's sidecar records; the flow metrics need OpenCV
    (pip install 'longvid[metrics]'). What each metric detects: docs/metrics.md.
    """
    if max_side < 16:
        raise RecipeError([Problem("--max-side", f"must be at least 16 pixels, got {max_side}")])
    from longvid.eval.report import measure_paths, render_table

    results = measure_paths(paths, max_side=max_side)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        out.print(render_table(results))


@app.command()
@friendly
def compare(
    overrides: Overrides = None,
    recipes: Annotated[Optional[str], typer.Option("--recipes", help="Comma-separated recipes to run with the same "
                                                                     "prompt and seed.")] = None,
    videos: Annotated[Optional[str], typer.Option("--videos", help="Comma-separated existing videos or folders "
                                                                   "(a batch folder) to compare instead.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt (exact text).")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option("--negative-prompt", "-n")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s")] = None,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="The report folder.")] = "compare",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    interpolate: InterpolateOpt = False,
):
    """Side by side: synchronized players, metrics, time and memory, contact sheets, in one offline page.

    \b
    Examples:
      longvid compare --recipes freenoise-wan-4x,freelong-wan-4x,freeloc-wan-4x --prompt "a fox in snow" --seed 7 --out cmp/
      longvid compare --videos runs/a/x.mp4,runs/b/x.mp4 --out cmp2/
      longvid compare --videos runs/fox/ --out cmp3/          # every video of a (batch) folder

    \b
    Recipes sharing a model load it once; a video already made for the same recipe is reused. Writes
    OUT/index.html, side-by-side.mp4, sheets/*.png, plots/per-frame.png (with matplotlib) and metrics.json.
    """
    from pathlib import Path

    if (recipes is None) == (videos is None):
        raise RecipeError([Problem("--recipes", "give either --recipes a,b,... or --videos x.mp4,y.mp4")])
    out_path = Path(out_dir)
    if out_path.exists() and not out_path.is_dir():
        raise RecipeError([Problem("--out", f"{out_path} exists and is not a folder")])
    names = [n.strip() for n in (recipes or videos or "").split(",") if n.strip()]
    if not names:
        raise RecipeError([Problem("--recipes" if recipes is not None else "--videos", "the list is empty")])
    from longvid.eval import compare as cmp

    if videos is not None:
        if overrides or prompt is not None or negative_prompt is not None or seed is not None:
            raise RecipeError([Problem("--videos", "existing videos take no prompt, seed or overrides; use --recipes "
                                                   "to generate")])
        entries = cmp.entries_for(cmp.find_videos(names))
    else:
        options = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed}
        resolved = cmp.resolve_recipes(names, overrides or [], options, out_path / "videos", interpolate)
        _quiet_libraries()
        from longvid.interrupts import StopRequests

        with StopRequests(immediate=True):
            import longvid.runner  # noqa: F401 - torch and diffusers, under a clean stop

        def said(label, path, reused) -> None:
            if not quiet:
                err.print(f"{label}: {'reused' if reused else 'made'} {path}")

        if quiet:
            entries = cmp.generate_all(resolved, on_video=said)
        else:
            with _progress() as progress:
                entries = cmp.generate_all(resolved, progress=progress, on_video=said)
    page = cmp.write_report(entries, out_path)
    if not quiet:
        err.print(f"wrote {page} ({len(entries)} videos side by side)")


@app.command()
@friendly
def explain(
    recipe: Annotated[str, typer.Argument(help="Built-in recipe name or YAML path.")],
    overrides: Overrides = None,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Folder for the PNG figures.")] = "explain",
    interpolate: InterpolateOpt = False,
):
    """Pictures of what a recipe's methods will do, without loading the model (PNG figures).

    \b
    Examples:
      longvid explain freeloc-wan-4x --out masks/            # attention tiers and position maps
      longvid explain freenoise-wan-4x video.num_frames=161 --out fig/

    \b
    FreeNoise window weights, FreeLong's low-pass filter, FreeLOC's tiers and positions, UltraViCo's decayed
    pairs, RoPE frequency edits, FreeSwim's windows, Pyramid Flow's schedule (needs matplotlib: the plots extra).
    """
    from pathlib import Path

    from longvid.recipe.resolve import resolve

    resolved = resolve(recipe, overrides or [], interpolate=interpolate)
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise RecipeError([Problem("--out", f"{target} exists and is not a folder")])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RecipeError([Problem("explain", "the figures need matplotlib: pip install 'longvid[plots]'")]) from None
    _quiet_libraries()
    from longvid.eval.explain import explain as draw

    for path in draw(resolved, target):
        out.print(str(path))


@app.command()
@friendly
def probe(
    recipe: RecipeArg,
    overrides: Overrides = None,
    out_file: Annotated[str, typer.Option("--out", "-o", help="The preset JSON to write.")] = "",
    prompts: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A probe prompt (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing preset file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
):
    """Probe every self-attention layer for FreeLOC (VRPR or TSA) at the recipe's length; write a layer preset.

    \b
    Examples:
      longvid probe --recipe freeloc-wan-4x --out presets/my-wan.json
      longvid generate --recipe freeloc-wan-4x methods.freeloc.preset=presets/my-wan.json
    """
    from longvid.recipe.resolve import resolve

    if not out_file:
        raise RecipeError([Problem("--out", "name the preset JSON to write, e.g. --out presets/my-wan.json")])
    resolved = resolve(recipe, overrides or [])
    if resolved.model.family != "wan":
        raise RecipeError([Problem("model.family", f"FreeLOC probing needs a Wan model, got {resolved.model.family}")])
    target = Path(out_file).expanduser()
    if target.is_dir() or (target.exists() and not overwrite):
        what = "is a folder" if target.is_dir() else "already exists; pass --overwrite to replace it"
        raise RecipeError([Problem("--out", f"{target} {what}")])
    _quiet_libraries()
    from longvid.probe import DEFAULT_PROMPTS, probe as run_probe, write_preset
    from longvid.runner import load_adapter

    adapter = load_adapter(resolved)
    try:
        adapter.check_run(resolved)
        if quiet:
            preset = run_probe(adapter, resolved, tuple(prompts or DEFAULT_PROMPTS))
        else:
            with _progress() as progress:
                preset = run_probe(adapter, resolved, tuple(prompts or DEFAULT_PROMPTS),
                                   progress=lambda done, total: progress("probe", done, total))
    finally:
        adapter.close()
    write_preset(preset, target)
    for den, layers in preset["tsa"].items():
        total = len(preset["relative_change"][den])
        err.print(f"{den}: TSA on layers {layers} ({len(layers)} of {total}), VRPR on the other {total - len(layers)}")
    err.print(f"wrote {target}; use it with methods.freeloc.preset={target}")


@app.command()
@friendly
def show(recipe: Annotated[str, typer.Argument(help="Built-in recipe name or YAML path.")],
         overrides: Overrides = None, interpolate: InterpolateOpt = False):
    """Print the resolved recipe (all layers applied, stages in order). Loads no model.

    \b
    Example:
      longvid show wan-t2v-1.3b sampler.guidance_scale=6
    """
    from longvid.recipe.resolve import resolve, to_yaml

    out.print(to_yaml(resolve(recipe, overrides or [], interpolate=interpolate)), end="")


@app.command()
@friendly
def validate(paths: Annotated[list[Path], typer.Argument(help="Recipe files or folders (searched recursively).")]):
    """Check recipes without loading any model; exit 2 if any is invalid.

    \b
    Example:
      longvid validate configs/
    """
    from longvid.recipe.resolve import resolve

    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))
        elif path.exists():
            files.append(path)
        else:
            raise RecipeError([Problem("paths", f"no such file or folder: {path}")])
    bad = 0
    for file in files:
        try:
            resolve(str(file))
            out.print(f"ok       {file}")
        except LongvidError as e:
            bad += 1
            out.print(f"invalid  {e}")
    out.print(f"{len(files) - bad} valid, {bad} invalid")
    if bad or not files:
        raise typer.Exit(2)


@app.command()
def recipes():
    """List the built-in recipes."""
    from longvid.recipe.recipes import builtin_recipes, recipe_header

    for name, path in builtin_recipes().items():
        out.print(f"{name:28s} {recipe_header(path)}")


@app.command()
def models():
    """List the model families and the built-in random-weight tiny models (try any recipe on them)."""
    from longvid import registry
    from longvid.models.specs import TINY_VARIANTS

    for family in registry.MODELS:
        out.print(f"{family:14s} {registry.model_spec(family).description}")
        variants = [v for v, f in TINY_VARIANTS.items() if f == family]
        tiny = ", ".join(f"tiny:{v}" for v in variants)
        out.print(f"{'':14s} tiny models: {tiny}  (e.g. longvid generate --recipe <recipe> "
                  f"model.path=tiny:{variants[0]})")


@app.command()
def methods():
    """List the long-video methods and the model families each supports."""
    from longvid import registry

    if not registry.METHODS:
        out.print("no methods registered")
    for name in registry.METHODS:
        cls = registry.method_class(name)
        out.print(f"{name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}  [{', '.join(sorted(cls.families))}]")


@app.command()
def doctor():
    """Report torch / CUDA / diffusers versions, GPU memory and the ffmpeg binary."""
    _quiet_libraries()
    import imageio_ffmpeg

    from longvid.io.sidecar import environment_info

    info = environment_info()
    info["ffmpeg_exe"] = imageio_ffmpeg.get_ffmpeg_exe()
    for key, value in info.items():
        out.print(f"{key:22s} {value}")


# ------------------------------------------------------------------------------------------- helpers


def _shapes(recipe) -> dict[str, Any]:
    """Latent shape and attention size of the output stage (the standard checkpoints' geometry), and the stages."""
    from longvid import registry
    from longvid.recipe.stages import plan_stages

    spec = registry.model_spec(recipe.model.family)
    v = recipe.video
    f_lat = spec.latent_frames(v.num_frames)
    h_lat, w_lat = v.height // spec.vae_spatial, v.width // spec.vae_spatial
    p = spec.patch_spatial
    stages = [{"name": s.name, "num_frames": s.num_frames, "height": s.height, "width": s.width,
               "start_step": s.start_step, "steps": s.sampler.steps, "upsample": s.upsample} for s in plan_stages(recipe)]
    return {"latent_shape": [1, spec.latent_channels, f_lat, h_lat, w_lat],
            "tokens": f_lat * (h_lat // p) * (w_lat // p) if spec.name != "animatediff" else None, "stages": stages}


def _shape_summary(recipe) -> str:
    from longvid import registry

    spec = registry.model_spec(recipe.model.family)
    v = recipe.video
    f_lat = spec.latent_frames(v.num_frames)
    h_lat, w_lat = v.height // spec.vae_spatial, v.width // spec.vae_spatial
    shape = (1, spec.latent_channels, f_lat, h_lat, w_lat)
    p = spec.patch_spatial
    if spec.name == "animatediff":
        tokens = f"temporal attention: {h_lat * w_lat} sequences of {f_lat} frames at full resolution"
    else:
        tokens = f"self-attention tokens: {f_lat * (h_lat // p) * (w_lat // p)} ({f_lat} x {h_lat // p} x {w_lat // p})"
    summary = f"# latent shape {shape}; {tokens}"
    if recipe.stages:
        from longvid.recipe.stages import plan_stages

        parts = [f"{p.name} {p.width}x{p.height}x{p.num_frames} steps {p.start_step}..{p.sampler.steps - 1}"
                 + (f" after a {p.upsample} hand-off" if p.upsample else "") for p in plan_stages(recipe)]
        summary += "\n# stages: " + " -> ".join(parts)
    return summary


def _quiet_libraries() -> None:
    """Library chatter (deprecations, 'kept in float32' notes) is not for CLI users."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


class _progress:
    """A rich progress bar over denoising steps and decode, as a ``progress(event, done, total)`` callable."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:10s}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err, transient=False)
        self.bar.__enter__()
        self.tasks: dict[str, int] = {}
        return self

    def __call__(self, event: str, done: int, total: int) -> None:
        if event not in self.tasks:
            kind, _, stage = event.partition(":")  # "step", "step:<stage>", "handoff:<stage>", "decode", "items"
            label = {"step": "denoise", "handoff": "upsample"}.get(kind, kind) + (f" {stage}" if stage else "")
            self.tasks[event] = self.bar.add_task(label, total=total)
        self.bar.update(self.tasks[event], completed=done, total=total)

    def print(self, text: str) -> None:
        """A line above the bars (user text: never read as markup)."""
        self.bar.console.print(text, markup=False, highlight=False)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
