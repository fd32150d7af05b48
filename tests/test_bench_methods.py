"""scripts/bench/freenoise.py and scripts/bench/freelong.py in their ``--quick --cpu-time`` modes, so the method
benchmarks never rot: each runs as ``make bench`` runs it (a subprocess from the repository root) and its JSON is
checked value by value (times and memory measured, numerics checks passed, the diffusers FreeNoise peer
compared on the same input)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_quick(script: str, tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--cpu-time", "--json", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_freenoise_bench_quick(tmp_path):
    report, stdout = run_quick("freenoise", tmp_path)
    assert report["quick"] is True and report["cpu_time"] is True
    assert report["threads"] == 1 and report["clock"] == "process_time"

    # 1. UNet step: vanilla, longvid block and layer fusion and diffusers' FreeNoise (the peer), round-robin
    [row] = report["unet"]["rows"]
    assert row["frames"] == 48 and row["views"] == 9
    impls = ("vanilla", "block", "layer", "peer")
    for impl in impls:
        assert len(row["times_s"][impl]) == report["rounds"] >= 1, impl
        assert all(positive(t) for t in row["times_s"][impl]), impl
        assert positive(row["min_s"][impl]) and positive(row["motion_modules_min_s"][impl]), impl
        assert row["motion_modules_min_s"][impl] < row["min_s"][impl], impl  # the hooks saw part of the step
    assert row["finite"] is True
    for key in ("block/vanilla", "block/peer", "layer/vanilla"):
        lo, med = row["ratios"][key]
        assert positive(lo) and positive(med), key
    assert row["ratios"]["block/peer"][0] == row["min_s"]["block"] / row["min_s"]["peer"]
    # peak memory of block fusion and of the peer, each in a fresh subprocess
    assert row["memory_errors"] == {}
    assert positive(row["peak_mb"]["block"]) and positive(row["peak_mb"]["peer"])
    assert row["mem_ratios"]["block/peer"] == row["peak_mb"]["block"] / row["peak_mb"]["peer"]
    # longvid's block fusion equals diffusers' FreeNoise on the same input (48 = 16 + 8·4 frames: no tail view)
    check = row["peer_check"]
    assert check["frames_compared"] == 48
    assert positive(check["out_max"]) and check["out_max"] > 0.1  # a real output, not zeros
    assert 0 <= check["max_abs_diff"] <= 1e-4 * check["out_max"], check
    assert check["max_abs_diff"] > 0  # two different code paths: float32 rounding differs somewhere
    assert check["ok"] is True and report["unet"]["peer_ok"] is True

    # 2. temporal attention layer: full vs WindowFusedAttnProcessor, numerics against a float64 reference
    [attn] = report["attn"]["rows"]
    assert attn["frames"] == 64 and attn["finite"] is True
    assert all(positive(t) for t in attn["times_s"]["full"] + attn["times_s"]["windows"])
    assert positive(attn["ratio"][0]) and attn["memory_errors"] == {} and positive(attn["peak_mb"]["windows"])
    numerics = report["attn"]["numerics"]
    assert numerics["ok"] is True and numerics["rel"] <= 1e-4 and positive(numerics["rms"])

    # 3. Wan context windows: timings at two frame counts, window calls as the window maths says
    wan = report["wan"]
    assert [r["frames"] for r in wan["rows"]] == [81, 161]
    assert [r["views"] for r in wan["rows"]] == [1, 3] and [r["latent"] for r in wan["rows"]] == [21, 41]
    assert all(positive(r["full"]) and positive(r["windows"]) and r["finite"] for r in wan["rows"])

    goals = {g["name"]: g for g in report["goals"]}
    assert {"unet_block_time", "unet_block_memory", "unet_block_equals_peer", "attn_numerics", "wan_linear"} <= set(goals)
    assert goals["unet_block_equals_peer"]["met"] is True and goals["attn_numerics"]["met"] is True
    assert "## Goals" in stdout and "peer (diffusers)" in stdout and "max abs Δ block vs peer" in stdout
    assert "| 48 " in stdout


def test_freelong_bench_quick(tmp_path):
    report, stdout = run_quick("freelong", tmp_path)
    assert report["quick"] is True and report["cpu_time"] is True and report["threads"] == 1
    [row] = report["rows"]
    assert (row["h"], row["w"], row["c"], row["frames"]) == (8, 8, 320, 128) and row["official_run"] is True
    for impl in ("official", "longvid", "vanilla"):
        assert row["times_s"][impl] and all(positive(t) for t in row["times_s"][impl]), impl
        assert positive(row["peak_mb"][impl]), impl
    assert row["notes"] == []
    # longvid's layer equals the official restatement (outputs ~0.5) and beats it in time and memory
    assert positive(row["out_max"]) and row["out_max"] > 0.1
    assert row["max_abs_diff"] is not None and row["max_abs_diff"] <= 1e-5
    assert row["official_over_longvid"] == row["min_s"]["official"] / row["min_s"]["longvid"]
    assert row["official_over_longvid"] > 1.5
    assert row["mem_official_over_longvid"] == row["peak_mb"]["official"] / row["peak_mb"]["longvid"]
    assert row["mem_official_over_longvid"] > 1.2
    assert positive(row["longvid_over_vanilla"]) and positive(row["mem_longvid_over_vanilla"])

    goals = {g["name"]: g for g in report["goals"]}
    assert set(goals) == {"speedup_vs_official", "memory_vs_official", "layer_vs_vanilla"}
    assert all(g["stand_in"] is True and g["frames"] == 128 for g in goals.values())  # F=256 is not run in --quick
    assert goals["speedup_vs_official"]["value"] == row["official_over_longvid"]
    assert "## Goals" in stdout and "| 8×8, C=320" in stdout and "official / longvid" in stdout
