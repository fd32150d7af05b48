"""scripts/bench/batch.py in its ``--quick`` mode, so the batch benchmark never rots: three modes as real processes,
their videos byte-identical, the model loaded once per worker, the numbers consistent with the walls measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_batch_bench_quick(tmp_path):
    out = tmp_path / "b.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "batch.py"), "--quick", "--items", "2",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["items"] == 2 and report["rounds"] == 1
    assert report["identical_videos"] is True  # the three modes made the same two videos, byte for byte
    assert report["model_loads"] == {"batch-1": [1], "batch-2": [2]}  # once per worker, not per item
    for mode, walls in report["wall_s"].items():
        assert report["items_per_min"][mode] == [2 * 60 / w for w in walls]
    assert report["two_workers_speedup"] == report["median_items_per_min"]["batch-2"] / \
        report["median_items_per_min"]["batch-1"]
    costs = report["item_costs"]
    assert [c["index"] for c in costs] == [0, 1] and [c["load_s"] > 0 for c in costs] == [True, False]
    assert all(0 < c["fixed_s"] < c["item_s"] for c in costs)
    assert report["fixed_share_of_real_item"] == report["median_fixed_s"] / 72.0
    assert "| separate |" in proc.stdout and "(goal < 5%)" in proc.stdout
