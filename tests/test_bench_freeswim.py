"""scripts/bench/freeswim.py in its ``--quick`` mode, so the FreeSwim benchmark never rots: it runs as ``make bench``
runs it (a subprocess from the repository root) and its JSON is checked value by value (every kernel timed, the
flex kernels equal to the tiled window, block masks as sparse as the geometry says and no dense mask, the calls of
each step kind with their batches, cache mode cheaper than nocache and than the official batch-2 layout)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench" / "freeswim.py"
KERNELS = ["tiled", "official", "flex-tile", "full"]
STEPS = ["vanilla", "nocache", "cache", "official cache"]


def test_freeswim_bench_quick(tmp_path):
    out = tmp_path / "f.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # cold inductor caches compile ~10 flex/mask graphs: about 1.5 min on an idle 2-vCPU VM, a few under load
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--cpu-time", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["cpu_time"] is True and report["threads"] == 1
    assert report["failures"] == []

    # 1. kernels: the two goal grids (halved), every kernel timed round-robin
    kernels = {c["name"]: c for c in report["kernels"]}
    assert list(kernels) == ["1080p", "4K"]
    for name, c in kernels.items():
        f, h, w = c["grid"]
        assert c["seq"] == f * h * w
        for k in KERNELS:
            assert len(c["times_s"][k]) == c["rounds"] == report["rounds"] >= 1, (name, k)
            assert all(t > 0 for t in c["times_s"][k]) and c["finite"][k] is True, (name, k)
        assert c["ratio_to_tiled"]["tiled"] == 1.0
        # outputs: flex (both orders) equal the tiled window; full attention is something else
        diff = c["max_abs_diff_vs_tiled"]
        assert diff["tiled"] == 0.0
        assert 0 <= diff["official"] < 1e-4 and 0 <= diff["flex-tile"] < 1e-4, diff
        assert diff["full"] > 1e-3
        # block masks counted from the masks equal the exact geometry, and the window is sparse
        for k in ("official", "flex-tile"):
            s = c["setup"][k]
            assert s["block_fraction"] == c["block_density"][k] and 0 < s["block_fraction"] < 1, (name, k)
            assert s["kept_blocks"] <= s["n_blocks"] ** 2
            assert s["mask_first_wall_s"] > 0 and s["compile_first_call_wall_s"] > 0
        assert 0 < c["element_density"] < c["block_density"]["official"]
        assert c["dense_mask_mb"] == c["seq"] ** 2 / 2**20
    # the window branch beats the official raster flex on CPU at the 4K shape (4.1-4.7x measured; the goal is 4x
    # at full size, not judged here), and full attention costs more than the window there too
    big = kernels["4K"]
    assert big["ratio_to_tiled"]["official"] > 2 and big["ratio_to_tiled"]["full"] > 1.5
    # peak memory of each kernel in its own subprocess (largest grid only), all far below a dense S x S mask
    assert set(big["memory"]) == set(KERNELS) and kernels["1080p"]["memory"] == {}
    for k in KERNELS:
        assert "error" not in big["memory"][k], big["memory"][k]
        assert 0 <= big["peak_mb"][k] < big["dense_mask_mb"], k
    assert 0 <= big["memory"]["official"]["mask_peak_mb"] < big["dense_mask_mb"] / 10

    # 2. kept-block fraction at the real F = 21 grids (no 4K under --quick): tile-major keeps fewer blocks than raster
    dens = {d["name"]: d for d in report["densities"]}
    assert list(dens) == ["720p", "1080p"]
    for d in dens.values():
        assert d["grid"][0] == 21
        assert 0 < d["element"] < d["tile"] < d["raster"] < 1, d
    assert round(dens["1080p"]["element"], 3) == 0.201 and round(dens["1080p"]["raster"], 3) == 0.481
    assert dens["1080p"]["tile"] < 0.26

    # 3. one step: each implementation ran the calls it claims, with the batches it claims
    st = report["step"]
    assert st["batches"] == {"vanilla": [1, 1], "nocache": [2, 2], "cache": [2, 1, 1, 1],
                             "official cache": [2, 2, 2, 2]}
    for n in STEPS:
        assert len(st["per_step_s"][n]) == st["rounds"] and st["finite"][n] is True, n
    r = st["rounds"]
    assert {k: len(v) for k, v in st["calls_s"].items()} == {
        "vanilla": 2 * r, "dual": 2 * r, "store": 2 * r, "window": 2 * r, "reuse": r, "window₂": 2 * r, "reuse₂": r}
    # same values, less work: longvid's batch-1 calls equal the first half of the official batch-2 ones; with the
    # same latents a reuse reproduces its store (the cached cross-attention is the one it would compute)
    for name, d in st["checks_max_abs_diff"].items():
        assert 0 <= d < 1e-5, (name, d)
    other = st["other_max_abs_diff"]
    assert other["reuse vs store (cond)"] < 1e-5
    assert other["window vs dual (uncond)"] > 1e-4  # the override changes the window branch
    assert other["vanilla vs dual (cond)"] > 1e-4
    # cache mode is cheaper per step than nocache and than the official batch-2 layout; a window-only call costs
    # less than a dual one and a batch-2 call more than its batch-1 twin
    med = st["median_per_step_s"]
    # (official cache vs nocache is not ordered at these toy sizes: the window kernel costs about full attention)
    assert med["cache"] < med["official cache"] and med["cache"] < med["nocache"], med
    assert st["ratios"]["nocache / cache"] > 1.15 and st["ratios"]["official cache / cache"] > 1.15  # (~1.4-1.6 here)
    calls = st["median_call_s"]
    assert calls["window"] < calls["dual"] and calls["reuse"] < calls["reuse₂"] and calls["window"] < calls["window₂"]
    # the cache: one (1, S, dim) float32 tensor per block, on the model's device; real sizes computed in bf16
    cache = st["cache"]
    layers, inner = st["model"]["layers"], st["model"]["heads"] * st["model"]["head_dim"]
    assert cache["entries"] == layers and cache["shapes"] == [[1, st["seq"], inner]]
    assert cache["bytes"] == cache["expected_bytes"] == layers * st["seq"] * inner * 4 and cache["devices"] == ["cpu"]
    assert "not measurable" in cache["offload"]
    real = {c["model"]: c for c in st["real_cache"]}
    assert real["Wan 2.1 1.3B"]["bytes_bf16"] == 30 * 171360 * 1536 * 2  # ~15.8 GB
    assert real["Wan 2.1 14B"]["bytes_bf16"] == 40 * 21 * 135 * 240 * 5120 * 2
    for n in STEPS:
        assert "error" not in st["memory"][n] and st["peak_mb"][n] >= 0, st["memory"][n]
    assert st["memory"]["cache"]["cache_mb"] == cache["bytes"] / 2**20 and st["memory"]["nocache"]["cache_mb"] == 0

    # goals: the five, judged only on the full run
    assert [g["name"] for g in report["goals"]] == [
        "tiled >= 2.5x faster than official at 1080p", "tiled >= 4.0x faster than official at 4K", "no dense mask",
        "cache >= 2.0x faster than nocache", "cache >= 1.3x faster than official cache"]
    assert all(g["judged"] is False and isinstance(g["met"], bool) for g in report["goals"])
    assert report["goals"][2]["met"] is True
    assert "## Goals" in proc.stdout and "| 4K (1, 68, 120)" in proc.stdout and "not judged" in proc.stdout
