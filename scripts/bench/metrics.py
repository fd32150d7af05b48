"""Weight-free video metrics on one CPU thread: seconds per 100 frames of a 480×832 video, per stage and all together.

    .venv/bin/python scripts/bench/metrics.py [--quick] [--rounds N] [--json FILE]

The clip is synthetic: a photo-like texture (fine luma detail, smoother colour) panning 2 px per frame, 100 frames
of 480×832 (H×W), written as libx264 yuv420p crf 18 (as longvid writes videos). numpy, BLAS and OpenCV run on one
thread (``cv2.setNumThreads(1)``); ffmpeg decodes in its own process with its default threads, so its CPU seconds
are reported beside the wall time. Stages, timed round-robin (min / median):

1. **decode + downscale**: ``open_frames(mp4)`` — ffmpeg decodes and area-scales to 148×256;
2. **numpy area downscale**: ``open_frames(array)`` — the in-memory route, 480×832 uint8 to 148×256;
3. **prepare** (luma) and each metric group's accumulator over the 148×256 frames (seams at frame 16):
   ``frame_diffs`` (mafd, mafd_spike, flicker_2nd, vbench_flicker, seam_score), ``thumbnails``
   (temporal_hf_ratio, repetition), ``sharpness``, ``color`` and ``flow`` (warp_error, flow_mag);
4. **all, from the MP4**: ``measure_path`` end to end — the goal: under 6.25 s per 100 frames (real time at 16 fps);
5. **all, from the array**: ``measure`` of the in-memory frames;
6. **compare's report**: ``longvid compare``'s work beyond the generations (metrics, contact sheets, per-frame series,
   the side-by-side MP4, the plot, the page) for 3 copies of the clip, per 100 frames of a video, and as a share of
   a real 81-frame item (Wan2.1-1.3B 480p, ≈ 72 s of denoising at half an H200's peak; notes/performance.md §4.1).

``--quick``: 24 frames of 240×416, one round. Sizes are H×W.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import _harness as hb  # noqa: E402
from longvid.eval.compare import entries_for, write_report  # noqa: E402
from longvid.eval.frames import open_frames  # noqa: E402
from longvid.io.video import VideoWriter  # noqa: E402
from longvid.eval.metrics import SCALAR_METRICS, accumulators, measure, measure_path, prepare  # noqa: E402

FPS = 16
PAN_PX = 2  # pixels per frame
GOAL_S = 100 / FPS  # real time at 16 fps, per 100 frames
COMPARED = 3  # videos in the compare report
REAL_ITEM_S = 72.0  # a real 81-frame item's denoising (Wan2.1-1.3B 480p, 50 steps x CFG, half an H200's peak)


def texture(height: int, width: int) -> np.ndarray:
    """Gaussian-blurred noise: luma detail of σ = 2 px plus colour of σ = 6 px, float (height, width, 3)."""
    rng = np.random.default_rng(0)
    fy = np.fft.fftfreq(height)[:, None, None]
    fx = np.fft.fftfreq(width)[None, :, None]

    def smooth(channels: int, sigma: float) -> np.ndarray:
        noise = np.fft.fft2(rng.standard_normal((height, width, channels)), axes=(0, 1))
        out = np.fft.ifft2(noise * np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2)), axes=(0, 1)).real
        return out / out.std()

    return 128 + 40 * smooth(1, 2.0) + 20 * smooth(3, 6.0)


def make_clip(frames: int, height: int, width: int) -> np.ndarray:
    tex = np.clip(np.rint(texture(height, width + PAN_PX * frames)), 0, 255).astype(np.uint8)
    return np.stack([tex[:, PAN_PX * t:PAN_PX * t + width] for t in range(frames)])  # (F, H, W, 3)


def write_mp4(path: Path, clip: np.ndarray) -> None:
    with VideoWriter(path, fps=FPS, crf=18) as writer:  # as longvid writes a generated video
        writer.write(clip)


def read_all(source) -> list[np.ndarray]:
    with open_frames(source) as video:
        return [frame.copy() for frame in video]


def group_runner(name: str, frames: list, analysed_size, source_size):
    """Feed every prepared frame to a fresh accumulator of group ``name``, then take its result."""
    def run():
        group = accumulators(analysed_size, source_size, [16], cv2)[name]
        for frame in frames:
            group.add(frame)
        return group.result()
    return run


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished (waited-for) ffmpeg processes
    return usage.ru_utime + usage.ru_stime


def compare_overhead(mp4: Path, tmp: Path, rounds: int) -> list[float]:
    """Seconds ``longvid compare`` spends on its report for ``COMPARED`` copies of the clip (the generations are
    not part of it): metrics, contact sheets, per-frame series, the side-by-side MP4, the plot and the page."""
    entries_dir = tmp / "compared"
    entries_dir.mkdir(exist_ok=True)
    videos = []
    for i in range(COMPARED):
        videos.append(entries_dir / f"method-{i}.mp4")
        shutil.copyfile(mp4, videos[-1])
    seconds = []
    for r in range(rounds):
        tick = time.perf_counter()
        write_report(entries_for(videos), tmp / f"report-{r}")
        seconds.append(time.perf_counter() - tick)
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="24 frames of 240×416, one round (seconds)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per stage (default 3; --quick 1)")
    p.add_argument("--json", metavar="FILE", help="write every number to FILE")
    args = p.parse_args()
    cv2.setNumThreads(1)
    rounds = args.rounds or (1 if args.quick else 3)
    frames, height, width = (24, 240, 416) if args.quick else (100, 480, 832)
    load0 = os.getloadavg()
    print(f"# Video metrics{' (--quick)' if args.quick else ''}: {frames} frames of {height}×{width} (H×W), "
          f"one thread (numpy/BLAS/OpenCV; ffmpeg decodes in its own process), OpenCV {cv2.__version__}, numpy "
          f"{np.__version__}, wall time; load average at start {load0[0]:.2f} on {os.cpu_count()} cores\n")
    clip = make_clip(frames, height, width)
    with tempfile.TemporaryDirectory() as tmp:
        mp4 = Path(tmp) / "pan.mp4"
        write_mp4(mp4, clip)
        with open_frames(mp4) as video:
            analysed_size, source_size = video.analysed_size, video.size
        decoded = read_all(mp4)
        prepared = [prepare(frame) for frame in decoded]
        stages = {"decode + downscale (ffmpeg)": lambda: read_all(mp4),
                  "numpy area downscale": lambda: read_all(clip),
                  "prepare (luma)": lambda: [prepare(frame) for frame in decoded]}
        stages.update({name: group_runner(name, prepared, analysed_size, source_size)
                       for name in accumulators(analysed_size, source_size, [16], cv2)})
        stages["all, from the MP4 (measure_path)"] = lambda: measure_path(mp4, seams=[16])
        stages["all, from the array (measure)"] = lambda: measure(clip, seams=[16])
        cpu0 = children_cpu_s()
        times, _ = hb.round_robin(stages, rounds=rounds, keep_first=False)
        ffmpeg_cpu_s = (children_cpu_s() - cpu0) / (2 * rounds)  # two stages read the MP4 each round
        metrics = measure_path(mp4, seams=[16])
        compare_s = compare_overhead(mp4, Path(tmp), rounds)
    per_100 = {name: min(ts) * 100 / frames for name, ts in times.items()}
    end_to_end = per_100["all, from the MP4 (measure_path)"]
    print(hb.markdown_table(
        ["stage", "s per 100 frames (min)", "min / median s per run"],
        [[name, f"{per_100[name]:.3f}", hb.fmt_s(ts)] for name, ts in times.items()]))
    print(f"\nffmpeg's own CPU time per decode + downscale: {ffmpeg_cpu_s * 100 / frames:.2f} s per 100 frames.")
    print(f"Analysed at {analysed_size[1]}×{analysed_size[0]} (H×W). Goal (all metrics from the MP4 faster than "
          f"real time at {FPS} fps, < {GOAL_S:.2f} s per 100 frames): {'met' if end_to_end < GOAL_S else 'MISSED'} "
          f"({end_to_end:.2f} s).\n")
    per_video = min(compare_s) / COMPARED
    print(f"longvid compare's report (beyond the generations) for {COMPARED} videos of {frames} frames: "
          f"{min(compare_s):.2f} s (min of {rounds}), {per_video * 100 / frames:.2f} s per 100 frames of a video "
          f"(metrics, contact sheet, per-frame series, its share of the side-by-side MP4): "
          f"{100 * per_video * 81 / frames / REAL_ITEM_S:.1f}% of a real 81-frame item's {REAL_ITEM_S:.0f} s.\n")
    values = [[key, "–" if metrics[key] is None else f"{metrics[key]:.3g}"] for key in SCALAR_METRICS]
    print(hb.markdown_table(["metric", "value"], values))
    hb.write_json(args.json, {"quick": args.quick, "frames": frames, "size": [width, height],
                              "analysed_size": list(analysed_size), "rounds": rounds, "threads": 1,
                              "pan_px_per_frame": PAN_PX, "times_s": times, "per_100_frames_s": per_100,
                              "ffmpeg_cpu_s_per_100_frames": ffmpeg_cpu_s * 100 / frames, "goal_s": GOAL_S,
                              "goal_met": end_to_end < GOAL_S, "metrics": metrics, "load_average": load0[0],
                              "compare_videos": COMPARED, "compare_report_s": compare_s,
                              "compare_s_per_100_frames_per_video": per_video * 100 / frames,
                              "real_item_s": REAL_ITEM_S})
    return 0


if __name__ == "__main__":
    sys.exit(main())
