"""What a batch tells its user: ``manifest-results.jsonl`` merged from every worker's log, ``longvid status`` with
the throughput and time left, the summary; torchrun's one worker per process (and per GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longvid.batch.manifest import resolve_items
from longvid.batch.worker import RESULTS, claim_path, merge_results, run, status
from longvid.errors import ModelLoadError
from longvid.models.base import pick_device

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
FAST = ["sampler.steps=2", "video.num_frames=5", "video.height=32", "video.width=48"]


def _folder(tmp_path: Path, logs: dict[str, list[dict]], n: int = 4) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "batch.json").write_text(json.dumps({"manifest": "m.txt", "items": n,
                                                "outputs": [f"{i:05d}.mp4" for i in range(n)]}))
    for name, records in logs.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records) + '{"index": 3, "sta')  # a cut line
    return out


def test_the_merged_results_keep_the_latest_done_else_failed_else_left(tmp_path):
    def rec(index, status, finished, **extra):
        return {"index": index, "status": status, "output": str(tmp_path / "out" / f"{index:05d}.mp4"),
                "finished": finished, **extra}

    out = _folder(tmp_path, {
        "batch-results.0-of-2.jsonl": [rec(0, "failed", 10.0, error="oom"), rec(0, "done", 20.0, seconds=4.0),
                                       rec(2, "failed", 11.0, error="first")],
        "batch-results.1-of-2.jsonl": [rec(1, "busy", 12.0), rec(0, "skipped", 30.0),
                                       rec(2, "failed", 40.0, error="second"),
                                       rec(9, "done", 50.0),  # not in the plan
                                       {**rec(3, "done", 60.0), "output": "/elsewhere/other-manifest-item.mp4"}]})
    merge_results(out)
    lines = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert [(r["index"], r["status"]) for r in lines] == [(0, "done"), (1, "left"), (2, "failed"), (3, "left")]
    assert lines[0]["seconds"] == 4.0 and lines[2]["error"] == "second"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


def test_status_gives_the_rate_so_far_and_the_time_left_while_workers_run(tmp_path):
    out = _folder(tmp_path, {"batch-results.0-of-1.jsonl": [
        {"index": 0, "status": "done", "seconds": 10.0, "load_s": 5.0, "finished": 1000.0},
        {"index": 1, "status": "done", "seconds": 10.0, "load_s": 0.0, "finished": 1100.0}]})
    for i in (0, 1):
        (out / f"{i:05d}.mp4").write_bytes(b"v")
        (out / f"{i:05d}.json").write_text("{}")
    counts = status(out)
    rate = 2 * 3600 / (1100 - 985)  # two items from the first one's start (load included) to the last one's end
    assert counts["items_per_hour"] == round(rate, 2) and counts["left"] == 2
    assert counts["eta_s"] is None  # nobody is working on the rest: no time left to give
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"), str(claim_path(out / "00002.mp4"))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        counts = status(out)
        assert (counts["running"], counts["left"]) == (1, 1)
        assert counts["eta_s"] == round(2 / rate * 3600)
    finally:
        holder.kill()
        holder.wait()


def test_the_cli_status_line_and_json(tmp_path):
    out = _folder(tmp_path, {"batch-results.0-of-1.jsonl": []})
    proc = subprocess.run([sys.executable, "-m", "longvid", "status", str(out)], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == ("items 4 done 0 running 0 failed 0 left 4 checkpointed 0 "
                                                            "items/h - eta -")
    proc = subprocess.run([sys.executable, "-m", "longvid", "status", str(out), "--json"], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=60)
    assert json.loads(proc.stdout) == {"items": 4, "done": 0, "running": 0, "failed": 0, "left": 4, "checkpointed": 0,
                                       "items_per_hour": None, "eta_s": None}


def test_torchrun_runs_one_worker_per_process_and_they_make_a_serial_runs_videos(tmp_path):
    manifest = tmp_path / "prompts.txt"
    manifest.write_text("a red fox\na calm lake\na storm\na desert\na forest\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--standalone", "-m", "longvid", "batch",
                           str(manifest), "--recipe", "demo", "--out", str(tmp_path / "out"), *FAST],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard 0/2: 3 items" in proc.stderr and "shard 1/2: 2 items" in proc.stderr
    for rank, indices in ((0, [0, 2, 4]), (1, [1, 3])):
        log = tmp_path / "out" / f"batch-results.{rank}-of-2.jsonl"
        assert [json.loads(line)["index"] for line in log.read_text().splitlines()] == indices
    merged = [json.loads(line) for line in (tmp_path / "out" / RESULTS).read_text().splitlines()]
    assert [r["status"] for r in merged] == ["done"] * 5 and all(r["peak_memory_bytes"] > 0 for r in merged)
    items = resolve_items(manifest, "demo", [*FAST, f"output.dir={tmp_path / 'serial'}"])
    run(items, (0, 1), tmp_path / "serial", manifest)
    serial = {p.name: p.read_bytes() for p in sorted((tmp_path / "serial").glob("*.mp4"))}
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "out").glob("*.mp4"))} == serial


def test_a_gpu_without_an_index_is_the_local_ranks_under_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("auto") == torch.device("cuda", 3) and pick_device("cuda") == torch.device("cuda", 3)
    assert pick_device("cuda:1") == torch.device("cuda", 1) and pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(ModelLoadError, match="LOCAL_RANK 4 but this node has 4 GPU"):
        pick_device("auto")


def test_the_batch_cli_ends_with_a_summary_table(tmp_path):
    manifest = tmp_path / "prompts.txt"
    manifest.write_text("a red fox\na calm lake\n")
    proc = subprocess.run([sys.executable, "-m", "longvid", "batch", str(manifest), "--recipe", "demo", "--out",
                           str(tmp_path / "out"), *FAST], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[0] done: 00000-a-red-fox-0.mp4" in proc.stderr and "batch summary" in proc.stderr
    row = next(line for line in proc.stderr.splitlines() if "│ done" in line)
    assert row.split("│")[2].strip() == "2"  # two items done
    assert "model loads:" in proc.stderr
