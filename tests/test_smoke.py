"""scripts/gpu/smoke.py, the GPU smoke check, run in its ``--tiny`` mode (same code path, tiny Wan on the CPU)
so the script never rots between GPU runs; its JSON is checked value by value."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu" / "smoke.py"
CASES = ["vanilla-81", "freenoise-161", "freelong-161", "upscale-720p", "freeloc-161", "ultravico-161",
         "freeswim-1080p", "fp8-81", "group-offload-81", "pyramid-flow-384p", "pyramid-offload-384p"]
STEPS = 3
REFINE_STEPS = int(STEPS * 0.7)  # strength 0.7: the last int(N * 0.7) steps of the refine schedule run


def _run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_tiny_smoke_runs_every_case(tmp_path):
    out = tmp_path / "smoke.json"
    proc = _run("--tiny", "--steps", str(STEPS), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "tiny" and report["steps"] == STEPS
    assert report["environment"]["torch"] and report["transformer_parameters"] > 0
    assert [c["case"] for c in report["cases"]] == CASES
    # tiny sizes: 9 frames (3 latent) and 17 frames (5 latent) at 32x48 (4x6 latents), refine 64x96 (8x12)
    shapes = {"vanilla-81": [1, 16, 3, 4, 6], "freenoise-161": [1, 16, 5, 4, 6], "freelong-161": [1, 16, 5, 4, 6],
              "upscale-720p": [1, 16, 3, 8, 12], "freeloc-161": [1, 16, 5, 4, 6], "ultravico-161": [1, 16, 5, 4, 6],
              "freeswim-1080p": [1, 16, 3, 8, 12], "fp8-81": [1, 16, 3, 4, 6], "group-offload-81": [1, 16, 3, 4, 6],
              "pyramid-flow-384p": [1, 16, 2, 8, 8], "pyramid-offload-384p": [1, 16, 2, 8, 8]}
    stage_steps = {"vanilla-81": {"main": STEPS}, "freenoise-161": {"main": STEPS}, "freelong-161": {"main": STEPS},
                   "upscale-720p": {"base": STEPS, "refine": REFINE_STEPS}, "freeloc-161": {"main": STEPS},
                   "ultravico-161": {"main": STEPS}, "freeswim-1080p": {"base": STEPS, "refine": REFINE_STEPS},
                   "fp8-81": {"main": STEPS}, "group-offload-81": {"main": STEPS},
                   "pyramid-flow-384p": {"main": 2}, "pyramid-offload-384p": {"main": 2}}  # steps = latent units
    for case in report["cases"]:
        name = case["case"]
        assert "error" not in case, case
        assert case["finite"] is True, name
        assert 0.5 < case["latents_std"] < 5 and math.isfinite(case["latents_std"]), name  # noise-like, not zeros
        assert case["latent_shape"] == shapes[name]
        assert case["total_s"] > 0 and case["peak_memory_bytes"] > 0
        assert case["peak_memory_kind"] == "process_peak_rss"  # CPU: no CUDA in the test environment
        assert {s["stage"]: s["steps"] for s in case["stages"]} == stage_steps[name]
        assert case["steps_timed"] == sum(stage_steps[name].values())
        for stage in case["stages"]:
            times = stage["step_s"]
            assert len(times) == stage["steps"] and all(t > 0 for t in times), (name, stage)
            assert stage["first_step_s"] == times[0]
            assert math.isclose(stage["median_step_s"], statistics.median(times[1:]), abs_tol=1e-4), (name, stage)
            assert sum(times) < case["total_s"]
        sidecar = {s["name"]: s for s in case["sidecar_stages"]}
        assert list(sidecar) == list(stage_steps[name])
        assert case["sidecar_timings"]["denoise_s"] > 0
    methods = {c["case"]: c["sidecar_stages"][-1]["methods"] for c in report["cases"]}  # the last stage's
    assert methods == {"vanilla-81": [], "freenoise-161": ["freenoise"], "freelong-161": ["freelong", "freenoise"],
                       "upscale-720p": [], "freeloc-161": ["freeloc"], "ultravico-161": ["ultravico"],
                       "freeswim-1080p": ["freeswim"], "fp8-81": [], "group-offload-81": [], "pyramid-flow-384p": [],
                       "pyramid-offload-384p": []}
    base, refine = report["cases"][3]["sidecar_stages"]
    assert (base["height"], base["width"], base["start_step"]) == (32, 48, 0)
    assert (refine["height"], refine["width"], refine["upsample"]) == (64, 96, "pixel")
    assert refine["start_step"] == STEPS - REFINE_STEPS and refine["handoff_s"] > 0
    # the memory knobs' cases run on models of their own: fp8 storage is close to vanilla, group offload (a no-op on
    # the CPU) equal to it
    by_name = {c["case"]: c for c in report["cases"]}
    vanilla = by_name["vanilla-81"]["latents_std"]
    assert abs(by_name["fp8-81"]["latents_std"] - vanilla) < 0.05 * vanilla
    assert by_name["group-offload-81"]["latents_std"] == vanilla
    assert by_name["pyramid-offload-384p"]["latents_std"] == by_name["pyramid-flow-384p"]["latents_std"]
    table = proc.stdout[proc.stdout.index("case "):]
    assert all(name in table for name in CASES) and "all cases ok" in proc.stdout


def test_unknown_case_is_refused(tmp_path):
    proc = _run("--tiny", "--cases", "vanilla-81,nope", "--out", str(tmp_path / "s.json"))
    assert proc.returncode == 2 and "unknown case(s) nope" in proc.stderr
    assert not (tmp_path / "s.json").exists()


def test_tiny_smoke_long_cases(tmp_path):
    """``--cases long``: one step per case at 2x / 4x the (tiny) trained length, each method against vanilla at the
    same length; every method must act (its latents differ from vanilla's) and record itself in the sidecar."""
    out = tmp_path / "long.json"
    proc = _run("--tiny", "--steps", "2", "--cases", "long", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = {c["case"]: c for c in json.loads(out.read_text())["cases"]}
    assert list(cases) == ["vanilla-161", "vanilla-321", "freeloc-321", "ultravico-321", "riflex-321", "ntk-161"]
    for name, case in cases.items():
        assert case["finite"] is True and case["latent_shape"] == [1, 16, 9 if "321" in name else 5, 4, 6], name
        method = [] if name.startswith("vanilla") else [name.split("-")[0]]
        assert case["sidecar_stages"][-1]["methods"] == method
        if method:
            vanilla = cases["vanilla-" + name.split("-")[1]]["latents_digest"]
            assert case["latents_digest"] != vanilla, name  # the method changed the computation
