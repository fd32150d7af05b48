"""scripts/bench/engine.py in its ``--quick`` mode, so the engine benchmark never rots; its JSON is checked value by
value (the old and new denoising paths agree bit for bit, checkpoint and hand-off numbers are real)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench" / "engine.py"
MODELS = ["tiny:wan", "tiny:animatediff", "mid-wan"]
WAN_13B_LATENT_BYTES = 16 * 21 * 60 * 104 * 4


def test_engine_bench_quick(tmp_path):
    out = tmp_path / "e.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["failures"] == []

    # 1. old (fcfb87f) vs new loop: same latents on every model, end to end and with the networks as no-ops
    assert [r["model"] for r in report["overhead"]] == MODELS
    assert [g["model"] for g in report["glue"]] == [f"{m} (null network)" for m in MODELS]
    for r in report["overhead"] + report["glue"]:
        assert r["identical"] is True and r["max_abs_diff"] == 0.0, r["model"]
        assert r["finite"] is True, r["model"]
        assert len(r["old_step_s"]) == len(r["new_step_s"]) == r["rounds"] >= 1
        assert all(t > 0 for t in r["old_step_s"] + r["new_step_s"]), r["model"]
        assert r["old_median_s"] > 0 and r["new_median_s"] > 0 and r["ratio"] > 0
        lo, hi = r["ratio_ci95"]
        assert lo <= r["ratio"] <= hi
    shapes = {r["model"]: r["latent_shape"] for r in report["overhead"]}
    assert shapes == {"tiny:wan": [1, 16, 3, 4, 6], "tiny:animatediff": [1, 4, 8, 8, 8], "mid-wan": [1, 16, 5, 16, 16]}
    calls = {r["model"]: r["calls_per_step"] for r in report["overhead"]}
    assert calls == {"tiny:wan": 2, "tiny:animatediff": 1, "mid-wan": 2}  # Wan: cond + uncond; AnimateDiff: batched
    mid, tiny = (next(r for r in report["overhead"] if r["model"] == m) for m in ("mid-wan", "tiny:wan"))
    assert mid["params_m"] > 20 * tiny["params_m"]  # really a larger network
    for g, r in zip(report["glue"], report["overhead"]):
        assert g["old_median_s"] < r["old_median_s"]  # the networks really were skipped

    # 2. checkpoint of Wan 1.3B-sized latents
    ckpt = report["checkpoint"]
    assert ckpt["latent_shape"] == [1, 16, 21, 60, 104] and ckpt["latent_bytes"] == WAN_13B_LATENT_BYTES
    assert ckpt["bytes_written"] >= WAN_13B_LATENT_BYTES
    assert ckpt["history_tensors"] >= 1  # the scheduler's multistep history was in the state
    assert ckpt["roundtrip_equal"] is True
    for key in ("save", "load", "load_cold", "capture"):
        assert len(ckpt[f"{key}_s"]) == ckpt["reps"] and all(t > 0 for t in ckpt[f"{key}_s"]), key
        assert ckpt[f"{key}_median_s"] > 0

    # 3. pixel hand-off: the streamed peak is below decoding, resizing and encoding everything at once
    cases = report["handoff"]["cases"]
    assert cases
    for case in cases:
        assert case["errors"] == []
        assert case["same_latents"] is True
        assert 0 < case["streamed_peak_mb"] < case["naive_peak_mb"], case
        assert case["resized_mb"] > case["decoded_mb"] > 0 and case["latent_buffers_mb"] > 0
    assert "## Goals" in proc.stdout and "| tiny:wan" in proc.stdout
