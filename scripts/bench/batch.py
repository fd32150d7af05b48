"""Batch throughput: items per minute and per-item overhead of ``longvid batch`` on the tiny model, with 1 and 2
workers, against the same items made by separate ``longvid generate`` calls.

Every mode runs as real processes (``python -m longvid``, one torch thread each), in a fresh output folder, and
the modes take turns round by round (rotated order), so machine noise hits them alike; medians are reported.

- ``batch-1``: one worker makes all items (the model loads once);
- ``batch-2``: two workers (``--shard 0/2`` and ``1/2``) at once on the same folder;
- ``separate``: one ``longvid generate`` per item (a process start, imports and a model load each).

Per item (``batch-1``): the worker's item time minus the engine's own denoise, decode and prompt-encoding times
is the tool's fixed cost per item (checks, claim, MP4 muxing, sidecar, logs). Those costs do not grow with the
model, so they are compared with a real item's denoising: Wan2.1-1.3B, 81 frames at 480×832, 50 steps with CFG
is about 72 s at half an H200's peak (notes/performance.md §4.1), a lower bound. The separate calls' videos must
equal the batch's byte for byte (same seeds and names), so the modes are compared on identical work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REAL_ITEM_DENOISE_S = 72.0  # Wan2.1-1.3B 81f 480x832, 50 steps x CFG, at 50% of an H200's planning peak
PROMPTS = ["a red fox in snow", "a calm lake at dawn", "a storm over the sea", "a desert road", "a pine forest",
           "a city at night", "a field of tulips", "a mountain river", "a lighthouse", "a busy market",
           "a snowy village", "a coral reef"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "longvid", *args]


def batch(folder: Path, manifest: Path, workers: int, overrides: list[str]) -> float:
    """Wall seconds of ``workers`` batch workers on one folder (all started together)."""
    tick = time.perf_counter()
    procs = [subprocess.Popen(_cli("batch", str(manifest), "--recipe", "demo", "--out", str(folder), "--quiet",
                                   "--shard", f"{i}/{workers}", *overrides), cwd=ROOT, env=ENV,
                              stderr=subprocess.PIPE, text=True) for i in range(workers)]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"batch worker failed: {err[-2000:]}")
    return time.perf_counter() - tick


def separate(folder: Path, prompts: list[str], overrides: list[str]) -> float:
    """Wall seconds of one ``longvid generate`` per item, one after another, with the batch's seeds and names."""
    tick = time.perf_counter()
    for i, prompt in enumerate(prompts):
        name = f"{i:05d}-{prompt.replace(' ', '-')}-{i}"
        proc = subprocess.run(_cli("generate", "--recipe", "demo", "--prompt", prompt, "--seed", str(i), "--out",
                                   str(folder), "--name", name, "--quiet", *overrides), cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"generate failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - tick


def item_costs(folder: Path) -> list[dict]:
    """Per item of a batch folder: the worker's item time, the engine's timings, the tool's fixed cost."""
    rows = []
    for line in (folder / "manifest-results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        timings = json.loads(Path(rec["output"]).with_suffix(".json").read_text())["timings"]
        engine = timings["denoise_s"] + timings["decode_s"] + timings.get("encode_s", 0.0)
        rows.append({"index": rec["index"], "item_s": rec["seconds"], "load_s": rec["load_s"],
                     "denoise_s": timings["denoise_s"], "decode_s": timings["decode_s"],
                     "encode_s": timings.get("encode_s", 0.0), "fixed_s": rec["seconds"] - engine})
    return rows


def videos(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.mp4"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 items, 1 round, 2 steps (~1 min)")
    p.add_argument("--items", type=int, default=None, help="items per batch (default 8; --quick 4)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of the three modes (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per item (default 100; --quick 2)")
    p.add_argument("--json", metavar="FILE", help="write every number to FILE")
    args = p.parse_args()
    items = args.items or (4 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 100)
    if not 1 <= items <= len(PROMPTS):
        p.error(f"--items must be 1..{len(PROMPTS)}")
    overrides = [f"sampler.steps={steps}", "video.num_frames=9", "video.height=64", "video.width=96"]
    prompts = PROMPTS[:items]

    walls: dict[str, list[float]] = {"batch-1": [], "batch-2": [], "separate": []}
    steady: dict[str, list[float]] = {"batch-1": [], "batch-2": []}  # items/min once the model is loaded
    costs: list[dict] = []
    loads: dict[str, list[int]] = {"batch-1": [], "batch-2": []}
    same = True
    order = list(walls)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "prompts.txt"
        manifest.write_text("".join(f"{p}\n" for p in prompts))
        for r in range(rounds):
            made = {}
            for mode in order[r % 3:] + order[:r % 3]:  # rotated: no mode always runs first or last
                folder = Path(tmp) / f"{mode}-{r}"
                if mode == "separate":
                    walls[mode].append(separate(folder, prompts, overrides))
                else:
                    # base seed 0: item i gets seed i, as the separate calls' --seed i
                    walls[mode].append(batch(folder, manifest, int(mode[-1]), [*overrides, "seed=0"]))
                    records = [json.loads(line) for line in (folder / "manifest-results.jsonl").read_text().splitlines()]
                    loads[mode].append(sum(rec["load_s"] > 0 for rec in records))
                    span = max(rec["finished"] for rec in records) - min(rec["finished"] - rec["seconds"]
                                                                        for rec in records)
                    steady[mode].append(items * 60 / span)
                    if mode == "batch-1":
                        costs += item_costs(folder)
                made[mode] = videos(folder)
            for mode in ("batch-2", "separate"):
                if made[mode] != made["batch-1"]:
                    same = False
                    print(f"round {r}: {mode} differs from batch-1: " + ", ".join(
                        n for n in sorted(set(made[mode]) | set(made["batch-1"]))
                        if made[mode].get(n) != made["batch-1"].get(n)), file=sys.stderr)
            same = same and len(made["batch-1"]) == items

    per_min = {m: [items * 60 / w for w in ws] for m, ws in walls.items()}
    med = {m: statistics.median(v) for m, v in per_min.items()}
    fixed = statistics.median(c["fixed_s"] for c in costs)
    report = {
        "quick": args.quick, "items": items, "rounds": rounds, "steps": steps, "cpus": os.cpu_count(),
        "wall_s": walls, "items_per_min": per_min, "median_items_per_min": med,
        "two_workers_speedup": med["batch-2"] / med["batch-1"],
        "steady_items_per_min": steady,
        "two_workers_steady_speedup": statistics.median(steady["batch-2"]) / statistics.median(steady["batch-1"]),
        "batch_vs_separate": med["batch-1"] / med["separate"],
        "model_loads": loads, "identical_videos": same,
        "item_costs": costs, "median_fixed_s": fixed, "median_item_s": statistics.median(c["item_s"] for c in costs),
        "real_item_denoise_s": REAL_ITEM_DENOISE_S, "fixed_share_of_real_item": fixed / REAL_ITEM_DENOISE_S,
    }
    write_json(args.json, report)
    print(f"# batch throughput: {items} items, {steps} steps, 9 frames 64x96, {rounds} round(s), 1 thread per worker")
    print("| mode | items/min (median) | wall s (median) | model loads |")
    print("|---|---|---|---|")
    for m in walls:
        n = {"batch-1": "1", "batch-2": "2 (one per worker)"}.get(m, f"{items} (one per item)")
        print(f"| {m} | {med[m]:.1f} | {statistics.median(walls[m]):.2f} | {n} |")
    print(f"2 workers vs 1: {report['two_workers_steady_speedup']:.2f}x items/min once loaded (goal >= 1.8 where "
          f"cores allow; {os.cpu_count()} CPUs), {report['two_workers_speedup']:.2f}x end to end (process start, "
          "imports and model load included)")
    print(f"batch vs separate generate calls: {report['batch_vs_separate']:.2f}x items/min")
    print(f"fixed cost per item (item time - denoise - decode - prompt encoding): {fixed * 1000:.0f} ms median; "
          f"{100 * report['fixed_share_of_real_item']:.2f}% of a real item's {REAL_ITEM_DENOISE_S:.0f} s denoising "
          "(goal < 5%)")
    print(f"model loads per worker: batch-1 {loads['batch-1']}, batch-2 {loads['batch-2']}; "
          f"identical videos across modes: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
