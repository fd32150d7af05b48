"""scripts/bench/pyramid_flow.py in its ``--quick`` mode, so the Pyramid Flow benchmark never rots: it runs as
``make bench`` runs it and its JSON is checked value by value (units timed, sequences growing with the history as
the pyramid plan says, the dense-masked, block and unmasked attention cores timed on the released 384p sequence)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyramid_flow_bench_quick(tmp_path):
    out = tmp_path / "p.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "pyramid_flow.py"), "--quick",
                           "--cpu-time", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["cpu_time"] is True and report["threads"] == 1
    [tiny] = report["configs"]
    assert tiny["config"] == "tiny" and tiny["finite"] is True and tiny["units"] == 4
    rows = tiny["rows"]
    assert [r["unit"] for r in rows] == [0, 1, 2, 3] and all(r["time_s"] > 0 for r in rows)
    # the longest stage-2 sequence: 16 text tokens + the history (stage 2: u-1 @full 256, u-2 @1/2 64, rest @1/4 16)
    # + the current 256 tokens
    expected = [16 + 256, 16 + 256 + 256, 16 + 64 + 256 + 256, 16 + 16 + 64 + 256 + 256]
    assert [r["seq"] for r in rows] == expected
    assert all(r["mask_mb"] == 2 * r["seq"] ** 2 / 2**20 for r in rows)
    [core] = report["attention"]
    assert core["label"] == "384p temp 16" and core["seq"] == 3068  # notes §5.3's 384p maximum (128 text tokens)
    assert 0.5 < core["kept_fraction"] < 0.7
    assert all(t > 0 for k in ("dense", "blocks", "unmasked") for t in core["times_s"][k])
    best = {k: min(t) for k, t in core["times_s"].items()}
    assert core["ratio"] == best["dense"] / best["unmasked"] and core["speedup"] == best["dense"] / best["blocks"]
    assert core["max_abs_delta"] <= 1e-5  # the block kernel is the dense masked attention
    assert "| 384p temp 16 | 3068" in proc.stdout and "it needs no L² mask" in proc.stdout
