"""A real SLURM: a job array of longvid batch tasks on a one-node cluster (scripts/slurm/local-cluster.sh, started
here when it is not up), and a task requeued mid-item with ``scontrol requeue``: every item ends exactly once and
every video equals a serial run's, byte for byte (the requeued item resumed from its checkpoint)."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from longvid.batch.manifest import resolve_items
from longvid.batch.worker import run
from longvid.io.checkpoint import checkpoint_dir

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "scripts" / "slurm" / "longvid-array.sbatch"
PYTHON = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "python"


@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "local-cluster.sh")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shutil.which("sbatch") and shutil.which("scontrol")


def _submit(workdir: Path, out: str, overrides: list[str], tasks: int) -> str:
    env = {**os.environ, "LONGVID": f"{PYTHON if PYTHON.exists() else 'python3'} -m longvid.cli",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["sbatch", "--parsable", f"--array=0-{tasks - 1}", f"--chdir={workdir}", "--export=ALL",
                           str(SBATCH), "prompts.txt", "demo", out, *overrides], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _wait_done(job: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
            return
        time.sleep(1)
    pytest.fail(f"job {job} did not finish in {timeout} s")


def _serial(workdir: Path, overrides: list[str]) -> dict[str, bytes]:
    manifest = workdir / "prompts.txt"
    items = resolve_items(manifest, "demo", [*overrides, f"output.dir={workdir / 'serial'}"])
    run(items, (0, 1), workdir / "serial", manifest)
    return {p.name: p.read_bytes() for p in sorted((workdir / "serial").glob("*.mp4"))}


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("batch-results.*.jsonl")) for line in f.read_text().splitlines()]


def test_a_job_array_makes_every_item_once_like_a_serial_run(cluster, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red fox\na calm lake\na storm\na desert\na forest\n")
    overrides = ["sampler.steps=2", "video.num_frames=5", "video.height=32", "video.width=48"]
    job = _submit(tmp_path, "out", overrides, tasks=2)
    _wait_done(job)
    out = tmp_path / "out"
    done = sorted(r["index"] for r in _results(out) if r["status"] == "done")
    assert done == [0, 1, 2, 3, 4]
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.mp4"))} == _serial(tmp_path, overrides)
    logs = sorted(tmp_path.glob(f"longvid-{job}_*.log"))
    assert len(logs) == 2 and all("shard" in log.read_text() for log in logs)


def test_a_requeued_task_resumes_its_item_and_the_batch_ends_exactly_once(cluster, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red fox\na calm lake\na storm\n")
    # a periodic checkpoint every 25 of 400 steps: its first one shows the item is denoising with most steps left,
    # so the requeue lands mid-item however fast or slow this machine loads the model
    overrides = ["sampler.steps=400", "video.num_frames=5", "video.height=32", "video.width=48",
                 "runtime.checkpoint=every_n", "runtime.checkpoint_every=25"]
    job = _submit(tmp_path, "out", overrides, tasks=1)
    out = tmp_path / "out"
    ckpt = checkpoint_dir(out / "00000-a-red-fox-0.mp4")
    deadline = time.monotonic() + 180
    while not (ckpt.is_dir() and any(ckpt.iterdir())):
        assert time.monotonic() < deadline, "the task never checkpointed its first item"
        time.sleep(0.05)
    assert subprocess.run(["scontrol", "requeue", f"{job}_0"], capture_output=True, text=True).returncode == 0
    # SLURM holds a requeued job for about two minutes (reason BeginTime); start it now to keep the test short
    deadline = time.monotonic() + 120
    while "BeginTime" not in subprocess.run(["squeue", "-h", "-j", job, "-o", "%r"], capture_output=True,
                                            text=True).stdout:
        assert time.monotonic() < deadline, "the task was not requeued"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}_0", "StartTime=now"], capture_output=True, check=True)
    _wait_done(job)
    log = (tmp_path / f"longvid-{job}_0.log").read_text()
    assert "checkpointed at step" in log and "restart 1" in log  # stopped with a checkpoint, then requeued
    assert sorted(r["index"] for r in _results(out) if r["status"] == "done") == [0, 1, 2]
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.mp4"))} == _serial(tmp_path, overrides)
