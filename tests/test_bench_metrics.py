"""scripts/bench/metrics.py in its ``--quick`` mode, so the metrics benchmark never rots: it runs as ``make bench``
would and its JSON is checked value by value (every stage timed, per-100-frame numbers derived from the min times,
the goal verdict consistent with them, and the measured metrics right for the 2 px/frame pan it times)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["decode + downscale (ffmpeg)", "numpy area downscale", "prepare (luma)", "frame_diffs", "thumbnails",
          "sharpness", "color", "flow", "all, from the MP4 (measure_path)", "all, from the array (measure)"]


def test_metrics_bench_quick(tmp_path):
    out = tmp_path / "m.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "metrics.py"), "--quick", "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["frames"] == 24 and report["rounds"] == 1 and report["threads"] == 1
    assert report["size"] == [416, 240] and report["analysed_size"] == [256, 148]
    assert list(report["times_s"]) == STAGES and list(report["per_100_frames_s"]) == STAGES
    for stage, times in report["times_s"].items():
        assert len(times) == 1 and times[0] > 0
        assert report["per_100_frames_s"][stage] == min(times) * 100 / 24
    total = report["per_100_frames_s"]["all, from the MP4 (measure_path)"]
    assert report["goal_s"] == 6.25 and report["goal_met"] == (total < 6.25)
    assert report["ffmpeg_cpu_s_per_100_frames"] > 0
    metrics = report["metrics"]
    assert metrics["frames"] == 24 and metrics["fps"] == 16.0 and metrics["size"] == [416, 240]
    assert 1.8 < metrics["flow_mag"] < 2.2  # the clip pans 2 px per frame of the source
    assert metrics["repetition_lag"] is None and metrics["seams"] == [16] and metrics["notes"] == []
    assert "| flow " in proc.stdout and "s per 100 frames" in proc.stdout and "Goal" in proc.stdout
    assert report["compare_videos"] == 3 and len(report["compare_report_s"]) == 1
    assert report["compare_s_per_100_frames_per_video"] == min(report["compare_report_s"]) / 3 * 100 / 24
    assert "longvid compare's report" in proc.stdout
