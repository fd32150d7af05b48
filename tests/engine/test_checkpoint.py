"""Checkpoint and resume: a real SIGTERM at any step, a rerun, and the same bits as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longvid import runner
from longvid.core.sampler import load_scheduler_state, scheduler_state
from longvid.io.checkpoint import EXIT_CHECKPOINTED, CheckpointError, Checkpointed, checkpoint_dir
from longvid.recipe.resolve import resolve
from tests.helpers import animatediff_recipe, wan_recipe

REPO = Path(__file__).resolve().parents[2]


def _recipe(mapping, out, **runtime):
    mapping["output"] = {"dir": str(out), "name": "clip"}
    mapping["runtime"] = {**mapping.get("runtime", {}), "checkpoint": "on_signal", **runtime}
    return resolve(mapping)


def _signal_at(event_wanted: str, step: int, sig=signal.SIGTERM):
    """A progress callback that sends a real signal to this process when ``event_wanted`` reaches ``step``."""

    def progress(event, done, total):
        if event == event_wanted and done == step:
            os.kill(os.getpid(), sig)

    return progress


def _interrupt_then_resume(recipe, event, step, adapter=None):
    with pytest.raises(Checkpointed) as info:
        runner.generate(recipe, adapter=adapter, progress=_signal_at(event, step))
    folder = Path(recipe.output.dir)
    ckpt = checkpoint_dir(folder / "clip.mp4")
    assert (ckpt / "state.json").is_file()
    assert not (folder / "clip.mp4").exists() and not (folder / "clip.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".clip.mp4")]  # no partial video left
    resumed = runner.generate(recipe, adapter=adapter)
    assert not ckpt.exists()  # a finished run removes its checkpoint
    return info.value, resumed


CASES = {
    # UniPC multistep (history in the scheduler state)
    "wan": lambda: wan_recipe("tiny:wan", num_frames=9),
    # DDIM with eta: the noise generator's state must survive too
    "animatediff-eta-freenoise": lambda: dict(animatediff_recipe("tiny:animatediff", num_frames=24),
                                              methods={"freenoise": {"window": 8, "stride": 4}}),
    # FreeLong's step window depends on the absolute step: it switches on after the interruption
    "wan-freelong-late": lambda: dict(wan_recipe("tiny:wan", num_frames=33),
                                      methods={"freelong": {"window": 9, "steps": [0.5, 1.0]}}),
    "animatediff-freelong": lambda: dict(animatediff_recipe("tiny:animatediff", num_frames=20),
                                         methods={"freelong": {"window": 8}, "freenoise": {"fusion": "none"}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_checkpoint_and_resume_is_bit_identical(case, tmp_path):
    def mapping():
        m = CASES[case]()
        m["sampler"]["steps"] = 6
        if "animatediff" in case:
            m["sampler"]["eta"] = 0.5
        return m

    uninterrupted = runner.generate(_recipe(mapping(), tmp_path / "a"))
    err, resumed = _interrupt_then_resume(_recipe(mapping(), tmp_path / "b"), "step", 2)
    assert err.exit_code == EXIT_CHECKPOINTED == 75
    assert str(err).startswith("SIGTERM: checkpointed at step 2/6 -> ") and "rerun the same command" in str(err)
    assert torch.equal(resumed.latents, uninterrupted.latents)
    assert resumed.sidecar["resumed_from"] == {"stage": "main", "step": 2}
    assert (tmp_path / "b" / "clip.mp4").read_bytes() == (tmp_path / "a" / "clip.mp4").read_bytes()


@pytest.mark.parametrize("event, step", [("step:base", 3), ("step:refine", 1), ("handoff:refine", 5)])
def test_two_stage_resume_is_bit_identical(event, step, tmp_path):
    def mapping():
        m = wan_recipe("tiny:wan", num_frames=9, height=32, width=48)
        m["sampler"]["steps"] = 5
        m["stages"] = {"base": {"height": 16, "width": 32}, "refine": {"strength": 0.6, "sampler": {"flow_shift": 9}}}
        m["methods"] = {"freelong": {"window": 5, "stages": ["refine"]}}
        return m

    uninterrupted = runner.generate(_recipe(mapping(), tmp_path / "a"))
    err, resumed = _interrupt_then_resume(_recipe(mapping(), tmp_path / "b"), event, step)
    expected = {"step:base": "stage base, step 3/5", "step:refine": "stage refine, step 3/5",
                "handoff:refine": "the hand-off to stage refine"}[event]  # kept before the stage's noise
    assert expected in str(err)
    assert torch.equal(resumed.latents, uninterrupted.latents)


def test_signal_during_decode_keeps_the_final_latents(tmp_path):
    uninterrupted = runner.generate(_recipe(wan_recipe("tiny:wan", num_frames=9), tmp_path / "a"))
    err, resumed = _interrupt_then_resume(_recipe(wan_recipe("tiny:wan", num_frames=9), tmp_path / "b"), "decode", 1)
    assert "checkpointed at the end of denoising" in str(err)
    assert torch.equal(resumed.latents, uninterrupted.latents)
    assert resumed.sidecar["resumed_from"]["step"] == 3
    assert (tmp_path / "b" / "clip.mp4").read_bytes() == (tmp_path / "a" / "clip.mp4").read_bytes()


def test_every_n_survives_a_crash_and_resumes(tmp_path):
    """A crash (no signal, no cleanup) after step 5 leaves the step-4 checkpoint; the rerun resumes from it."""
    def recipe(out):
        m = wan_recipe("tiny:wan", num_frames=9)
        m["sampler"]["steps"] = 7
        return _recipe(m, out, checkpoint="every_n", checkpoint_every=2)

    uninterrupted = runner.generate(recipe(tmp_path / "a"))

    def crash(event, done, total):
        if done == 5:
            raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        runner.generate(recipe(tmp_path / "b"), progress=crash)
    state = json.loads((tmp_path / "b" / ".clip.ckpt" / "state.json").read_text())
    assert state["step"] == 4 and len(list((tmp_path / "b" / ".clip.ckpt").glob("state-*.safetensors"))) == 1
    resumed = runner.generate(recipe(tmp_path / "b"))
    assert resumed.sidecar["resumed_from"] == {"stage": "main", "step": 4}
    assert torch.equal(resumed.latents, uninterrupted.latents)


def test_another_recipes_checkpoint_is_refused_and_restart_discards_it(tmp_path):
    mapping = wan_recipe("tiny:wan", num_frames=9)
    with pytest.raises(Checkpointed):
        runner.generate(_recipe(mapping, tmp_path), progress=_signal_at("step", 1))
    other = _recipe(dict(wan_recipe("tiny:wan", num_frames=9), seed=11), tmp_path)
    with pytest.raises(CheckpointError) as info:
        runner.generate(other)
    message = str(info.value)
    assert "holds a checkpoint of a different recipe" in message and "--restart" in message and "\n" not in message
    assert not (tmp_path / "clip.mp4").exists()
    restarted = runner.generate(other, restart=True)
    fresh = runner.generate(other, write=False)
    assert torch.equal(restarted.latents, fresh.latents)
    # where the output goes and the checkpoint settings are not part of the recipe's identity
    with pytest.raises(Checkpointed):
        runner.generate(_recipe(wan_recipe("tiny:wan", num_frames=9), tmp_path / "c"), progress=_signal_at("step", 1))
    same = _recipe(wan_recipe("tiny:wan", num_frames=9), tmp_path / "c", checkpoint="every_n")
    assert runner.generate(same).sidecar["resumed_from"]["step"] == 1


def test_unreadable_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    ckpt = tmp_path / ".clip.ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable checkpoint.*--restart"):
        runner.generate(_recipe(wan_recipe("tiny:wan", num_frames=9), tmp_path))
    (ckpt / "state.json").write_text(json.dumps({"longvid_checkpoint": 1, "recipe_hash": "x", "tensors_file": "../x"}))
    with pytest.raises(CheckpointError):
        runner.generate(_recipe(wan_recipe("tiny:wan", num_frames=9), tmp_path))


def test_scheduler_state_round_trip_is_exact():
    """Every attribute (multistep history included) survives a JSON + tensors round trip mid-schedule."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from longvid.models.tiny import _wan_scheduler

    def eps(t):
        return torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(int(t)))

    for cls in (UniPCMultistepScheduler, DPMSolverMultistepScheduler):
        def fresh():
            s = cls.from_config(_wan_scheduler().config)
            s.set_timesteps(10)
            return s

        a, x = fresh(), torch.randn(1, 2, 3)
        for t in a.timesteps[:3]:
            x = a.step(eps(t), t, x).prev_sample
        tensors, data = scheduler_state(a)
        b, c = fresh(), fresh()
        load_scheduler_state(b, tensors, json.loads(json.dumps(data)))
        c._step_index = 3  # the step counter alone, without the solver's history
        xa = xb = xc = x
        for t in a.timesteps[3:]:
            xa, xb, xc = (s.step(eps(t), t, v).prev_sample for s, v in ((a, xa), (b, xb), (c, xc)))
        assert torch.equal(xa, xb)
        assert (xa - xc).abs().max() > 1e-4  # the history matters: dropping it changes the result


def test_cli_real_sigterm_exits_75_and_the_rerun_resumes(tmp_path):
    cmd = [sys.executable, "-m", "longvid.cli", "generate", "--recipe", "demo", "sampler.steps=300",
           "video.num_frames=5", "runtime.checkpoint=every_n", "runtime.checkpoint_every=1", "--out", str(tmp_path),
           "--name", "clip", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    state = tmp_path / ".clip.ckpt" / "state.json"
    deadline = time.monotonic() + 60
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert state.exists(), "the run never reached the denoising loop"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("stopped: SIGTERM: checkpointed at step ") and line.endswith(
        "rerun the same command to resume") and str(tmp_path / ".clip.ckpt") in line
    stopped_at = json.loads(state.read_text())["step"]
    again = subprocess.run(cmd + ["--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    sidecar = json.loads(again.stdout)
    assert sidecar["resumed_from"] == {"stage": "main", "step": stopped_at}
    assert (tmp_path / "clip.mp4").is_file() and not (tmp_path / ".clip.ckpt").exists()
