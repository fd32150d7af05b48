"""scripts/bench/freeloc.py in its ``--quick`` mode, so the FreeLOC/UltraViCo attention benchmark never rots: it runs as
``make bench`` runs it (a subprocess from the repository root) and its JSON is checked value by value (every kernel
timed, each output equal to its float64 reference, densities consistent with the geometry, plans cached)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench" / "freeloc.py"
KERNELS = ["full", "TSA", "VRPR", "UltraViCo"]


def test_freeloc_bench_quick(tmp_path):
    out = tmp_path / "f.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["failures"] == []
    cases = report["cases"]
    assert [c["frames"] for c in cases] == [41, 81]
    assert report["round_to"] == max(1, round(128 * report["sizes"]["h"] * report["sizes"]["w"] / 1560))

    for c in cases:
        # every kernel really ran and was timed, round-robin
        for k in KERNELS:
            assert len(c["times_s"][k]) == c["rounds"] >= 1, k
            assert all(t > 0 for t in c["times_s"][k]), k
            assert c["median_s"][k] > 0 and c["finite"][k] is True, k
        assert c["ratio_to_full"]["full"] == 1.0

        # densities: exact from the plans, equal to the pure geometry's count, TSA sparser than VRPR
        geo = c["geometry"]
        for k in ("TSA", "VRPR"):
            g = geo[k]
            assert 0 < g["kept_density"] <= 1 and 0 < g["real_p_density"] <= 1, k
            assert g["geometry_agrees"] is True, k
            assert g["scored_density"] >= g["kept_density"], k  # masks are applied to candidate supersets
            assert 0 <= g["masked_density"] <= g["scored_density"], k  # masks only where membership varies
            assert 0 < g["masked_tasks"] <= g["tasks"], k
            assert g["real_p_plan_mb_estimate"] > 0 and g["real_p_plan_build_s_estimate"] > 0, k
        assert geo["TSA"]["kept_density"] < geo["VRPR"]["kept_density"]
        assert geo["TSA"]["real_p_density"] < geo["VRPR"]["real_p_density"]
        assert geo["full"]["kept_density"] == geo["UltraViCo"]["kept_density"] == 1.0
        assert c["gflop_kept"]["TSA"] < c["gflop_kept"]["VRPR"] <= c["gflop_kept"]["full"]

        # mask building: the plan is cached at these sizes, and building it costs more than a cached call's mask work
        for k in ("TSA", "VRPR"):
            mb = c["mask_build"][k]
            assert mb["cached"] is True, k
            assert mb["build_median_s"] > mb["cached_overhead_s"] > 0, k
            assert mb["lookup_s"] > 0 and mb["first_call_s"] > 0 and mb["rotations_s"] > 0, k
            assert 0 < mb["cached_share_of_step"] < mb["first_call_share_of_step"], k
        assert c["step_estimate_s"] == 30 * c["median_s"]["full"]

    # numerics at the smaller size: every kernel against its dense float64 reference
    small = cases[0]
    assert set(small["max_abs_diff"]) == set(KERNELS)
    for k, d in small["max_abs_diff"].items():
        assert 0 <= d <= 1e-4, (k, d)
    assert cases[1]["max_abs_diff"] is None

    # peak memory of each kernel in its own subprocess (F = 81 under --quick)
    big = cases[1]
    assert set(big["memory"]) == set(KERNELS)
    for k in KERNELS:
        assert "error" not in big["memory"][k], big["memory"][k]
        assert big["peak_mb"][k] >= 0, k
    assert big["memory"]["TSA"]["plan_cached"] is True
    assert big["profile"] and set(big["profile"]) == set(KERNELS)

    # goals: the four, judged only on the full run
    assert [g["name"] for g in report["goals"]] == ["TSA <= 0.5x full", "VRPR <= 1.3x full", "UltraViCo <= 1.3x full",
                                                    "mask building < 1% of a step after the first"]
    assert all(g["judged"] is False and isinstance(g["met"], bool) for g in report["goals"])
    assert "## Goals" in proc.stdout and "| 81 | 1944 | TSA" in proc.stdout
