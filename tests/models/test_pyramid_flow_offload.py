"""runtime.offload for Pyramid Flow: per phase (model) and per layer (sequential), on the tiny model on a CPU.

The loop calls the DiT's and the VAE's submodules directly, so offload is by phases (``PyramidPipeline.phase``)
and by accelerate's per-module hooks; both must give the plain run's video exactly."""

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from tests.models.test_pyramid_flow import _image, _pyramid_recipe


def _frames(path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


def _run(tmp_path, name, adapter, image=None):
    from longvid import runner
    from longvid.recipe.resolve import resolve

    extra = {"output": {"dir": str(tmp_path), "name": name}}
    if image is not None:
        extra["image"] = str(image)
    result = runner.generate(resolve(_pyramid_recipe(**extra)), adapter=adapter)
    return result.latents, _frames(tmp_path / f"{name}.mp4")


@pytest.mark.parametrize("i2v", [False, True])
def test_model_offload_puts_only_the_running_phase_on_the_device(tmp_path, monkeypatch, i2v):
    """Each phase brings its components to the device after sending every other one back to CPU memory: text
    encoders for the prompts, the VAE for the i2v image and the decode, the DiT for the units. The moves are
    recorded (not made: this machine has no second device), and the run equals a plain one."""
    from longvid import runner
    from longvid.recipe.resolve import resolve

    image = _image(tmp_path / "in.png", (200, 40, 10), size=(64, 64)) if i2v else None
    adapter = runner.load_adapter(resolve(_pyramid_recipe()))
    try:
        plain = _run(tmp_path, "plain", adapter, image)
        pipe = adapter.pipe
        pipe.enable_model_cpu_offload(device=torch.device("cuda"))
        moves: list[tuple[str, str]] = []
        for key, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                monkeypatch.setattr(module, "to", lambda device, k=key, m=module: moves.append((k, str(device))) or m)
        phases: list[str] = []
        real_phase = pipe.phase
        monkeypatch.setattr(pipe, "phase", lambda name: phases.append(name) or real_phase(name))
        offloaded = _run(tmp_path, "offloaded", adapter, image)
    finally:
        adapter.close()
    assert torch.equal(offloaded[0], plain[0]) and np.array_equal(offloaded[1], plain[1])
    assert phases == (["text", "vae", "dit", "vae"] if i2v else ["text", "dit", "vae"])
    texts = sorted(k for k in pipe.components if k.startswith("text_encoder"))
    per_phase = {"text": texts, "dit": ["dit"], "vae": ["vae"]}
    everything = sorted(["dit", "vae", *texts])
    for i, name in enumerate(phases):  # every phase: the others to cpu first, then its own to the device
        step = moves[i * len(everything):(i + 1) * len(everything)]
        off = [k for k, d in step if d == "cpu"]
        on = [k for k, d in step if d == "cuda"]
        assert sorted(on) == per_phase[name] and sorted(off + on) == everything
        assert [d for _, d in step] == ["cpu"] * len(off) + ["cuda"] * len(on)


def test_sequential_offload_streams_every_layer_and_equals_a_plain_run(tmp_path):
    """accelerate's per-module hooks on every component: the weights leave for the meta device and come back layer
    by layer at each call (here from CPU memory to the CPU), through the loop's direct submodule calls."""
    from longvid import runner
    from longvid.recipe.resolve import resolve

    adapter = runner.load_adapter(resolve(_pyramid_recipe()))
    try:
        plain = _run(tmp_path, "plain", adapter)
        adapter.pipe.enable_sequential_cpu_offload(device=torch.device("cpu"))
        assert all(p.device.type == "meta" for m in (adapter.pipe.dit, adapter.pipe.vae) for p in m.parameters())
        offloaded = _run(tmp_path, "offloaded", adapter)
    finally:
        adapter.close()
    assert torch.equal(offloaded[0], plain[0]) and np.array_equal(offloaded[1], plain[1])
