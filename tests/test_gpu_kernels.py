"""scripts/gpu/kernels.py (the GPU kernel choices) in its ``--tiny`` mode, so it runs as shipped when a device is
lent: every candidate timed, the exact ones agree with the default, a missing backend is recorded and never
wins, the winner is the fastest exact candidate, and ``smoke.py --cases kernels`` runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "scripts" / "gpu"


def _run(script: str, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(GPU / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def _check(report: dict) -> None:
    assert report["mode"] == "tiny" and report["rounds"] == 2
    assert set(report["sections"]) == {"windows", "block", "freelong"}
    for name, results in report["sections"].items():
        for result in results:
            rows = {r["candidate"]: r for r in result["rows"]}
            yard = next(r for c, r in rows.items() if "yardstick" in c)
            # the yardstick is another computation (full attention, the global branch): timed, never a candidate
            assert yard["ok"] is False and yard["max_abs_diff"] > 1e-3 and len(yard["times_s"]) == 2, name
            for cand, r in rows.items():
                if "error" in r:  # a backend this device lacks
                    assert r["ok"] is False and r["times_s"] == [], (name, cand)
                    continue
                assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"]) and r["finite"], (name, cand)
                if "yardstick" not in cand:
                    assert r["ok"] and r["max_abs_diff"] <= 1e-5, (name, cand, r["max_abs_diff"])
            default = rows[result["default"]]
            assert default["ok"] and all(r["close"] for r in rows.values() if "error" not in r and r is not yard)
            exact = [r for r in rows.values() if r["ok"]]
            assert result["winner"] == min(exact, key=lambda r: r["median_s"])["candidate"], name
            assert result["winner_speedup_vs_default"] == default["median_s"] / rows[result["winner"]]["median_s"]
            assert result["winner_vs_yardstick"] > 0
    for name in ("windows", "block"):
        result = report["sections"][name][0]
        assert result["frames"] == 32 and len(result["rows"]) == 2 * 5 + 1  # 2 budgets x 5 backends + yardstick
    freelong = {r["candidate"]: r for r in report["sections"]["freelong"][0]["rows"]}
    # the CPU has no efficient / cuDNN SDPA kernels: recorded as errors; the flex block mask is exact
    assert "error" in freelong["sdpa per 1 frame(s), cudnn"] and freelong["flex block mask"]["ok"]
    assert freelong["sdpa per 2 frame(s), math"]["ok"]


def test_tiny_kernel_choices(tmp_path):
    out = tmp_path / "kernels.json"
    proc = _run("kernels.py", "--tiny", "--rounds", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check(json.loads(out.read_text()))
    assert "every section has a winner" in proc.stdout and "winner **" in proc.stdout


def test_smoke_runs_the_kernel_choices(tmp_path):
    out = tmp_path / "smoke.json"
    proc = _run("smoke.py", "--tiny", "--cases", "kernels", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["mode"] == "tiny" and set(report["sections"]) == {"windows", "block", "freelong"}


def test_bad_arguments_are_refused():
    for args in (["--tiny", "--sections", "windows,nope"], ["--tiny", "--rounds", "0"]):
        proc = _run("kernels.py", *args)
        assert proc.returncode == 2 and "kernels.py: error:" in proc.stderr, args
