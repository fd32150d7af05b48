"""End-to-end generation through ``from_pretrained`` on saved tiny models: files, sidecar, reproducibility, failures."""

import json
import subprocess
import sys
import time
from importlib import metadata

import imageio_ffmpeg
import numpy as np
import pytest
import torch

import longvid
from longvid import runner
from longvid.errors import ModelLoadError, OutputExistsError
from longvid.models.animatediff import AnimateDiffAdapter
from longvid.models.wan import WanAdapter
from longvid.recipe.resolve import resolve
from tests.helpers import animatediff_recipe, wan_recipe


def read_mp4(path):
    """(frames uint8 (F, H, W, 3), metadata) decoded with imageio-ffmpeg."""
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(gen)
    w, h = meta["size"]
    frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]
    return (np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)), meta


def small(mapping, out_dir, steps=2, **output):
    mapping["sampler"]["steps"] = steps
    mapping["output"] = {"dir": str(out_dir), **output}
    return mapping


def _check_video_and_sidecar(result, recipe, frames, width, height, fps):
    assert result.path.is_file() and result.path.suffix == ".mp4"
    video, meta = read_mp4(result.path)
    assert video.shape == (frames, height, width, 3)
    assert meta["fps"] == fps
    assert imageio_ffmpeg.count_frames_and_secs(str(result.path))[0] == frames
    assert video.std() > 1.0  # a picture, not a constant
    side_file = result.path.with_suffix(".json")
    sidecar = json.loads(side_file.read_text())
    assert sidecar == json.loads(json.dumps(result.sidecar))
    assert sidecar["longvid_sidecar"] == 1
    assert sidecar["output"] == str(result.path)
    assert sidecar["recipe"]["model"] == {**sidecar["recipe"]["model"], "family": recipe.model.family,
                                          "path": recipe.model.path}
    assert sidecar["recipe"]["video"] == {"num_frames": frames, "height": height, "width": width, "fps": fps}
    assert sidecar["seed"] == recipe.seed
    assert sidecar["latent_shape"] == list(result.latents.shape)
    env = sidecar["environment"]
    assert (env["torch"], env["diffusers"], env["longvid"]) == (torch.__version__, metadata.version("diffusers"),
                                                                longvid.__version__)
    assert {"load_s", "encode_s", "denoise_s", "decode_s", "total_s"} <= set(sidecar["timings"])
    assert all(v >= 0 for v in sidecar["timings"].values())
    assert sidecar["timings"]["total_s"] >= sidecar["timings"]["denoise_s"]
    assert sidecar["peak_memory"]["peak_rss_bytes"] > 10 * 2**20 and sidecar["peak_memory"]["peak_rss_scope"] == "run"
    return video


# ------------------------------------------------------------------------------------------- end to end


def test_wan_end_to_end_and_the_sidecar_reproduces_it(tiny_wan_dir, tmp_path):
    recipe = resolve(small(wan_recipe(tiny_wan_dir), tmp_path / "a"))
    result = runner.generate(recipe)
    assert result.latents.shape == (1, 16, 3, 4, 6)  # 9 frames -> 3 latent frames, 32x48 / 8
    video = _check_video_and_sidecar(result, recipe, frames=9, width=48, height=32, fps=8)

    again = runner.generate(resolve(result.path.with_suffix(".json"), options={"output.dir": str(tmp_path / "b")}))
    assert again.path.parent == tmp_path / "b"
    assert torch.equal(again.latents, result.latents)
    assert np.array_equal(read_mp4(again.path)[0], video)


def test_animatediff_end_to_end_and_the_sidecar_reproduces_it(tiny_animatediff_dir, tmp_path):
    recipe = resolve(small(animatediff_recipe(tiny_animatediff_dir, num_frames=6, width=40), tmp_path / "a"))
    result = runner.generate(recipe)
    assert result.latents.shape == (1, 4, 6, 16, 20)  # the tiny SD VAE downsamples 2x
    video = _check_video_and_sidecar(result, recipe, frames=6, width=40, height=32, fps=8)

    again = runner.generate(resolve(result.path.with_suffix(".json"), options={"output.dir": str(tmp_path / "b")}))
    assert torch.equal(again.latents, result.latents)
    assert np.array_equal(read_mp4(again.path)[0], video)


def _tiny_unet2d():
    """The SD 1.5-shaped UNet of ``tiny:animatediff``, as a plain UNet2DConditionModel (no motion modules)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2, attention_head_dim=8)


@pytest.fixture(scope="module")
def sd15_and_motion_adapter(tmp_path_factory):
    """The documented real-world layout: a Stable Diffusion 1.5 folder and a separate MotionAdapter folder."""
    from diffusers import StableDiffusionPipeline

    from longvid.models import tiny

    parts = tiny.build("animatediff")
    unet = _tiny_unet2d()
    root = tmp_path_factory.mktemp("sd15")
    sd = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                 unet=unet, scheduler=parts.scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.save_pretrained(root / "sd15")
    parts.motion_adapter.save_pretrained(root / "motion")
    return root / "sd15", root / "motion", parts, unet


def test_animatediff_from_sd15_folder_and_separate_motion_adapter(sd15_and_motion_adapter, tmp_path):
    from diffusers import AnimateDiffPipeline

    sd_dir, motion_dir, parts, unet = sd15_and_motion_adapter
    assert json.loads((sd_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    mapping = small(animatediff_recipe(sd_dir), tmp_path)
    mapping["model"]["motion_adapter"] = str(motion_dir)
    recipe = resolve(mapping)
    result = runner.generate(recipe)
    _check_video_and_sidecar(result, recipe, frames=8, width=32, height=32, fps=8)
    assert result.sidecar["recipe"]["model"]["motion_adapter"] == str(motion_dir)

    # The same components assembled in memory give the same latents: the loaded motion adapter is really used.
    pipe = AnimateDiffPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=unet,
                               motion_adapter=parts.motion_adapter, scheduler=parts.scheduler)
    reference = runner.generate(recipe, adapter=AnimateDiffAdapter.from_pipeline(pipe, recipe), write=False)
    assert torch.allclose(result.latents, reference.latents, atol=1e-5, rtol=0)
    assert reference.path is None


def test_sd15_folder_without_motion_adapter_is_an_error(sd15_and_motion_adapter, tmp_path):
    """diffusers would silently fill the motion modules with random weights; longvid refuses."""
    sd_dir, *_ = sd15_and_motion_adapter
    message = _load_error(animatediff_recipe(sd_dir), tmp_path)
    assert message.startswith("model.motion_adapter: ") and "has no motion adapter" in message


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_latents_other_seed_different(tiny_animatediff_dir, tmp_path):
    recipe = resolve(small(animatediff_recipe(tiny_animatediff_dir), tmp_path))
    adapter = runner.load_adapter(recipe)
    try:
        assert not adapter.pipe.unet.training and not adapter.pipe.text_encoder.training
        cond = runner.encode(adapter, recipe)
        assert cond.positive.grad_fn is None and cond.negative.grad_fn is None  # no autograd graph kept
        a = runner.generate(recipe, adapter=adapter, write=False).latents
        b = runner.generate(recipe, adapter=adapter, write=False).latents
        c = runner.generate(resolve(small(animatediff_recipe(tiny_animatediff_dir), tmp_path), ["seed=4"]),
                            adapter=adapter, write=False).latents
    finally:
        adapter.close()
    fresh = runner.generate(recipe, write=False).latents  # a second load of the same folder
    assert torch.equal(a, b)
    assert torch.equal(a, fresh)
    assert (a - c).abs().max() > 0.1
    assert not list(tmp_path.iterdir())  # write=False writes nothing


@pytest.mark.parametrize("variant", ["wan", "animatediff"])
def test_builtin_tiny_models_are_deterministic(variant, tmp_path):
    """``tiny:`` models are built in code; a second build and run gives the same latents (no dropout)."""
    make = wan_recipe if variant == "wan" else animatediff_recipe
    mapping = small(make(f"tiny:{variant}", num_frames=5), tmp_path)
    a = runner.generate(resolve(mapping), write=False).latents
    b = runner.generate(resolve(mapping), write=False).latents
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ failures


def test_no_partial_file_after_a_failure_mid_decode(tiny_wan_dir, tmp_path, monkeypatch):
    original = WanAdapter.decode_stream
    seen = {}

    def failing(self, latents, runtime=None):
        chunks = original(self, latents, runtime)
        yield next(chunks)  # the writer starts ffmpeg on this chunk: a temporary file now exists
        deadline = time.monotonic() + 10
        while not any(tmp_path.iterdir()) and time.monotonic() < deadline:  # ffmpeg creates it asynchronously
            time.sleep(0.05)
        seen["partial"] = sorted(p.name for p in tmp_path.iterdir())
        raise RuntimeError("VAE decode failed")

    monkeypatch.setattr(WanAdapter, "decode_stream", failing)
    recipe = resolve(small(wan_recipe(tiny_wan_dir), tmp_path))
    with pytest.raises(RuntimeError, match="VAE decode failed"):
        runner.generate(recipe)
    assert seen["partial"] and all(name.startswith(".") for name in seen["partial"])  # the test saw a partial file
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .mp4, no .json, no hidden temporary file


def test_no_overwrite_without_overwrite_and_before_any_model_loads(tiny_wan_dir, tmp_path, monkeypatch):
    recipe = resolve(small(wan_recipe(tiny_wan_dir), tmp_path, name="clip"))
    (tmp_path / "clip.mp4").write_bytes(b"precious")
    loads = []
    monkeypatch.setattr(runner, "load_adapter", lambda r: loads.append(r) or pytest.fail("loaded a model"))
    with pytest.raises(OutputExistsError) as info:
        runner.generate(recipe)
    assert str(info.value) == f"{tmp_path / 'clip.mp4'} already exists; pass --overwrite (overwrite=True in Python) to replace it"
    assert loads == []
    assert (tmp_path / "clip.mp4").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]

    monkeypatch.undo()
    result = runner.generate(resolve(small(wan_recipe(tiny_wan_dir), tmp_path, name="clip", overwrite=True)))
    assert result.path == tmp_path / "clip.mp4"
    assert read_mp4(result.path)[0].shape[0] == 9


def test_existing_sidecar_alone_also_blocks(tiny_wan_dir, tmp_path):
    recipe = resolve(small(wan_recipe(tiny_wan_dir), tmp_path, name="clip"))
    (tmp_path / "clip.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        runner.generate(recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.json"]
    assert (tmp_path / "clip.json").read_text() == "{}"


# ------------------------------------------------------------------------------------- model loading


def _load_error(mapping, tmp_path) -> str:
    with pytest.raises(ModelLoadError) as info:
        runner.generate(resolve(small(mapping, tmp_path / "out")))
    message = str(info.value)
    assert "\n" not in message
    assert not any((tmp_path / "out").glob("*.mp4"))
    return message


@pytest.mark.parametrize("make", [wan_recipe, animatediff_recipe], ids=["wan", "animatediff"])
def test_missing_local_model_folder(make, tmp_path):
    missing = tmp_path / "no-such-model"
    message = _load_error(make(missing), tmp_path)
    assert message.startswith(f"model.path: no folder '{missing}'")
    assert "local diffusers model folder" in message and "hf download" in message


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    message = _load_error(wan_recipe(folder), tmp_path)
    assert message.startswith(f"model.path: '{folder}' is a folder but not a diffusers model")
    assert "save_pretrained" in message


def test_uncached_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    message = _load_error(wan_recipe("longvid-test/not-cached-model"), tmp_path)
    assert message.startswith("model.path: cannot load 'longvid-test/not-cached-model'")
    assert "`hf download longvid-test/not-cached-model`" in message
    assert "set model.path to a local folder" in message


def test_missing_motion_adapter(tiny_animatediff_dir, tmp_path):
    mapping = animatediff_recipe(tiny_animatediff_dir)
    mapping["model"]["motion_adapter"] = str(tmp_path / "no-such-adapter")
    message = _load_error(mapping, tmp_path)
    assert message.startswith(f"model.motion_adapter: no folder '{tmp_path / 'no-such-adapter'}'")


# -------------------------------------------------------------------------------------------- public API


def test_public_generate_api(tiny_wan_dir, tmp_path):
    prompt = "a fox: 007 # [x] yes"
    result = longvid.generate(wan_recipe(tiny_wan_dir, num_frames=5), ["sampler.steps=2", "seed=4"], prompt=prompt,
                              seed=5, out_dir=str(tmp_path), name="api")
    assert result.path == tmp_path / "api.mp4"
    assert read_mp4(result.path)[0].shape == (5, 32, 48, 3)
    assert result.sidecar["seed"] == 4  # key=value overrides win over typed options
    assert result.sidecar["recipe"]["prompt"] == prompt
    assert result.latents.shape == (1, 16, 2, 4, 6)
    # a resolved Recipe is accepted too, and write=False returns latents only
    same = longvid.generate(resolve(result.path.with_suffix(".json")), write=False)
    assert same.path is None
    assert torch.equal(same.latents, result.latents)


def test_import_longvid_stays_torch_free():
    code = "import sys, longvid; print(callable(longvid.generate), 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]


def test_the_sidecar_peak_memory_is_the_runs_not_the_processes(tmp_path):
    """One loaded model, a large run then a small one (a batch): the small run's peak is its own, below the large
    run's, although the process once held more (Linux resets the resident-set peak at every run's start)."""
    options = {"output.dir": str(tmp_path), "output.overwrite": True}
    large = resolve("demo", ["video.num_frames=17", "video.height=128", "video.width=192", "sampler.steps=2"],
                    {**options, "output.name": "large"})
    small = resolve("demo", ["video.num_frames=5", "video.height=32", "video.width=48", "sampler.steps=2"],
                    {**options, "output.name": "small"})
    adapter = runner.load_adapter(large)
    try:
        peaks = [runner.generate(r, adapter=adapter).sidecar["peak_memory"] for r in (large, small)]
    finally:
        adapter.close()
    assert [p["peak_rss_scope"] for p in peaks] == ["run", "run"]
    assert peaks[1]["peak_rss_bytes"] < peaks[0]["peak_rss_bytes"] - 20 * 2**20
