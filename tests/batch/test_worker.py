"""Batch workers on the tiny model, as real processes where it matters: every item exactly once with two workers on
one folder, skip / redo rules, failures recorded without stopping the batch, shards that give the same files as one
worker, kill -9 and SIGTERM mid-item followed by a rerun that completes everything (the SIGTERM'd item resumed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longvid.batch.manifest import resolve_items
from longvid.batch.worker import held, is_done, run, status

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
FAST = ["sampler.steps=2", "video.num_frames=5", "video.height=32", "video.width=48"]


def _manifest(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "longvid.cli", "batch", *args, "--quiet"]


def _videos(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.mp4"))}


def test_a_batch_runs_each_item_once_then_skips_redoes_and_reports(tmp_path):
    manifest = _manifest(tmp_path, ["a red fox", "a calm lake", "a storm"])
    items = resolve_items(manifest, "demo", [*FAST, f"output.dir={tmp_path / 'out'}"])
    results = run(items, (0, 1), tmp_path / "out", manifest)
    assert [r.status for r in results] == ["done"] * 3
    counts = status(tmp_path / "out")
    assert {k: counts[k] for k in ("items", "done", "running", "failed", "left", "checkpointed")} == \
        {"items": 3, "done": 3, "running": 0, "failed": 0, "left": 0, "checkpointed": 0}
    assert counts["items_per_hour"] > 0 and counts["eta_s"] == 0
    first = _videos(tmp_path / "out")
    assert [r.status for r in run(items, (0, 1), tmp_path / "out", manifest)] == ["skipped"] * 3
    # a corrupt sidecar makes its item redo; --force redoes every item, bit-identically (same seeds)
    (tmp_path / "out" / "00001-a-calm-lake-1.json").write_text("{not json")
    assert not is_done(tmp_path / "out" / "00001-a-calm-lake-1.mp4", items[1].recipe)
    items = resolve_items(manifest, "demo", [*FAST, f"output.dir={tmp_path / 'out'}", "output.overwrite=true"])
    assert [r.status for r in run(items, (0, 1), tmp_path / "out", manifest)] == ["skipped", "done", "skipped"]
    assert [r.status for r in run(items, (0, 1), tmp_path / "out", manifest, force=True)] == ["done"] * 3
    assert _videos(tmp_path / "out") == first
    lines = (tmp_path / "out" / "batch-results.0-of-1.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["status"] == "done"


def test_a_failing_item_is_recorded_and_the_batch_goes_on(tmp_path, monkeypatch):
    from longvid import runner

    manifest = _manifest(tmp_path, ["a red fox", "BOOM", "a storm"])
    items = resolve_items(manifest, "demo", [*FAST, f"output.dir={tmp_path / 'out'}"])
    real = runner.generate

    def flaky(recipe, **kw):
        if recipe.prompt == "BOOM":
            raise RuntimeError("the GPU fell off the bus")
        return real(recipe, **kw)

    monkeypatch.setattr(runner, "generate", flaky)
    results = run(items, (0, 1), tmp_path / "out", manifest)
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert "fell off the bus" in results[1].error
    failure = json.loads((tmp_path / "out" / ".00001-BOOM-1.failed.json").read_text())
    assert failure["line"] == 2 and "fell off the bus" in failure["error"]
    assert status(tmp_path / "out")["failed"] == 1
    assert [r.status for r in run(items, (0, 1), tmp_path / "out", manifest, fail_fast=True)] == \
        ["skipped", "failed"]  # fail-fast stops after the first failure
    monkeypatch.setattr(runner, "generate", real)
    assert [r.status for r in run(items, (0, 1), tmp_path / "out", manifest)] == ["skipped", "done", "skipped"]
    assert not (tmp_path / "out" / ".00001-BOOM-1.failed.json").exists()  # a success clears the record


def test_shards_give_the_same_files_as_one_worker(tmp_path):
    manifest = _manifest(tmp_path, [f"prompt number {i}" for i in range(5)])
    one = tmp_path / "one"
    run(resolve_items(manifest, "demo", [*FAST, f"output.dir={one}"]), (0, 1), one, manifest)
    split = tmp_path / "split"
    items = resolve_items(manifest, "demo", [*FAST, f"output.dir={split}"])
    got = [run(items, (i, 3), split, manifest) for i in range(3)]
    assert sorted(r.index for rs in got for r in rs) == list(range(5))
    assert _videos(split) == _videos(one)  # seeds come from the item, not the shard


def test_two_workers_on_one_folder_make_every_item_exactly_once(tmp_path):
    manifest = _manifest(tmp_path, [f"a fox number {i}" for i in range(6)])
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cli(str(manifest), "--recipe", "demo", "--out", str(out), *FAST), cwd=REPO, env=ENV,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    done = [json.loads(line) for f in out.glob("batch-results.*.jsonl") for line in f.read_text().splitlines()]
    made = sorted(r["index"] for r in done if r["status"] == "done")
    assert made == list(range(6))  # each item generated exactly once across the two workers
    assert len(_videos(out)) == 6 and status(out)["done"] == 6


def _slow_batch(tmp_path: Path, *extra: str) -> tuple[Path, Path, list[str]]:
    manifest = _manifest(tmp_path, ["a red fox", "a slow river", "a storm"])
    out = tmp_path / "out"
    args = [str(manifest), "--recipe", "demo", "--out", str(out), "sampler.steps=300", "video.num_frames=5",
            "video.height=32", "video.width=48", *extra]
    return manifest, out, args


def _wait_for(predicate, proc, timeout=120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_kill_9_mid_item_frees_its_claim_and_the_rerun_completes(tmp_path):
    manifest, out, args = _slow_batch(tmp_path)
    proc = subprocess.Popen(_cli(*args), cwd=REPO, env=ENV, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: held(out / "00000-a-red-fox-0.mp4"), proc), "the worker never claimed an item"
    proc.kill()
    proc.wait(timeout=30)
    assert not held(out / "00000-a-red-fox-0.mp4")  # the lock died with its holder
    rerun = subprocess.run(_cli(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert status(out)["done"] == 3 and not [p for p in out.iterdir() if ".partial" in p.name]


def test_sigterm_checkpoints_the_item_and_the_rerun_resumes_it_bit_identically(tmp_path):
    manifest, out, args = _slow_batch(tmp_path, "runtime.checkpoint=on_signal")
    reference = tmp_path / "reference"
    ref_args = [a if a != str(out) else str(reference) for a in args]
    done = subprocess.run(_cli(*ref_args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(_cli(*args), cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: held(out / "00001-a-slow-river-1.mp4"), proc), "never reached the second item"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert status(out)["checkpointed"] == 1 and status(out)["done"] == 1
    rerun = subprocess.run(_cli(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert _videos(out) == _videos(reference)  # the resumed item equals the uninterrupted one


def test_a_stop_while_the_model_loads_ends_the_worker_at_once_with_nothing_lost(tmp_path, monkeypatch):
    from longvid import runner
    from longvid.io.checkpoint import Checkpointed

    manifest = _manifest(tmp_path, ["a red fox", "a calm lake"])
    items = resolve_items(manifest, "demo", [*FAST, f"output.dir={tmp_path / 'out'}"])
    real_load, waited = runner.load_adapter, []

    def slow_load(recipe):  # the stop lands mid-load; a load that waited for it would take the whole minute
        os.kill(os.getpid(), signal.SIGTERM)
        tick = time.monotonic()
        time.sleep(60)
        waited.append(time.monotonic() - tick)
        return real_load(recipe)

    monkeypatch.setattr(runner, "load_adapter", slow_load)
    with pytest.raises(Checkpointed, match="SIGTERM: stopped between items") as caught:
        run(items, (0, 1), tmp_path / "out", manifest)
    assert caught.value.exit_code == 75 and waited == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the worker's handler is gone with it
    assert not held(tmp_path / "out" / "00000-a-red-fox-0.mp4") and not _videos(tmp_path / "out")
    monkeypatch.setattr(runner, "load_adapter", real_load)
    assert [r.status for r in run(items, (0, 1), tmp_path / "out", manifest)] == ["done", "done"]


def test_a_stop_that_a_loader_rewraps_still_ends_the_worker_with_nothing_lost(tmp_path, monkeypatch):
    """diffusers turns any error while it reads weights into an OSError (and longvid into a ModelLoadError): the
    requested stop still wins over the rewrapped error."""
    from longvid import runner
    from longvid.errors import ModelLoadError
    from longvid.io.checkpoint import Checkpointed

    manifest = _manifest(tmp_path, ["a red fox"])
    items = resolve_items(manifest, "demo", [*FAST, f"output.dir={tmp_path / 'out'}"])

    def rewrapping_load(recipe):
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(60)
        except Exception as err:  # noqa: BLE001 - as diffusers' load_state_dict does
            raise ModelLoadError(f"cannot load the folder ({err})") from err

    monkeypatch.setattr(runner, "load_adapter", rewrapping_load)
    with pytest.raises(Checkpointed, match="SIGUSR1: stopped between items"):
        run(items, (0, 1), tmp_path / "out", manifest)


def test_a_stop_while_the_manifest_resolves_exits_75_before_any_item(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from longvid.batch import manifest as manifest_module
    from longvid.cli import app

    manifest = _manifest(tmp_path, ["a red fox"])
    real = manifest_module.resolve_items

    def resolve_then_stop(*args, **kwargs):  # SLURM's signal while the manifest is being checked
        items = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return items

    monkeypatch.setattr(manifest_module, "resolve_items", resolve_then_stop)
    result = CliRunner().invoke(app, ["batch", str(manifest), "--recipe", "demo", "--out", str(tmp_path / "out"),
                                      *FAST])
    assert result.exit_code == 75, result.output
    assert "SIGTERM: stopped before the first item" in result.output
    assert not (tmp_path / "out").exists()  # no item was started, nothing was written
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stop_between_items_is_not_lost_and_starts_no_further_item(tmp_path, monkeypatch):
    from longvid import runner
    from longvid.io.checkpoint import Checkpointed

    manifest = _manifest(tmp_path, ["a red fox", "a calm lake", "a storm"])
    items = resolve_items(manifest, "demo", [*FAST, f"output.dir={tmp_path / 'out'}"])
    real_generate = runner.generate

    def generate_then_stop(recipe, **kw):  # the signal comes just after the first item is published
        result = real_generate(recipe, **kw)
        os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(runner, "generate", generate_then_stop)
    with pytest.raises(Checkpointed, match="SIGUSR1: stopped between items"):
        run(items, (0, 1), tmp_path / "out", manifest)
    assert list(_videos(tmp_path / "out")) == ["00000-a-red-fox-0.mp4"]
    assert status(tmp_path / "out")["done"] == 1 and status(tmp_path / "out")["left"] == 2
    monkeypatch.setattr(runner, "generate", real_generate)
    assert [r.status for r in run(items, (0, 1), tmp_path / "out", manifest)] == ["skipped", "done", "done"]


def test_a_bad_manifest_line_is_refused_before_loading(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "x", "seed": -3}) + "\n")
    proc = subprocess.run(_cli(str(manifest), "--recipe", "demo", "--out", str(tmp_path / "o")), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bad.jsonl:2: seed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", ["9/4", "x"])
def test_a_bad_shard_is_one_line(bad, tmp_path):
    manifest = _manifest(tmp_path, ["a"])
    proc = subprocess.run(_cli(str(manifest), "--recipe", "demo", "--shard", bad), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--shard" in proc.stderr
