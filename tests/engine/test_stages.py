"""Coarse-to-fine stages: the schedule's start point, plan validation, the streamed hand-off, end to end."""

import json

import pytest
import torch

from longvid import runner
from longvid.core.guidance import guided
from longvid.core.sampler import StageJob, run_stage, set_timesteps
from longvid.core.stages import handoff, renoise, resize_frames
from longvid.errors import RecipeError
from longvid.recipe.resolve import resolve
from longvid.recipe.stages import plan_stages, start_step
from tests.helpers import animatediff_recipe, wan_recipe


def two_stage(mapping, base=(16, 32), **refine):
    mapping["stages"] = {"base": {"height": base[0], "width": base[1]}, "refine": {"strength": 0.7, **refine}}
    return mapping


# ------------------------------------------------------------------------------------------ the schedule


def test_freeswim_refine_schedule_starts_at_sigma_09546():
    """Shift 9, strength 0.7, 50 steps: steps 15..49 run, starting at t = 954, sigma = 0.9546 (notes §2.1)."""
    from longvid.models.tiny import _wan_scheduler

    scheduler = type(_wan_scheduler()).from_config(_wan_scheduler().config, flow_shift=9.0)
    assert start_step(50, 0.7) == 15
    timesteps = set_timesteps(scheduler, 50, torch.device("cpu"), start=15)
    assert int(timesteps[15]) == 954
    assert abs(float(scheduler.sigmas[15]) - 0.9546) < 5e-5
    assert len(timesteps) - 15 == 35
    noisy = renoise(scheduler, torch.zeros(1, 1, 1, 1, 1), torch.ones(1, 1, 1, 1, 1), timesteps[15])
    assert abs(noisy.item() - float(scheduler.sigmas[15])) < 1e-7  # sigma * noise + (1 - sigma) * 0
    plain = type(_wan_scheduler()).from_config(_wan_scheduler().config)  # without the shift: t = 875
    assert int(set_timesteps(plain, 50, torch.device("cpu"), start=15)[15]) == 875


@pytest.mark.parametrize("steps, strength, start", [(50, 1.0, 0), (50, 0.7, 15), (25, 0.6, 10), (8, 0.5, 4),
                                                    (10, 0.05, 10)])
def test_start_step_is_diffusers_get_timesteps(steps, strength, start):
    assert start_step(steps, strength) == start


def test_plan_of_a_shipped_recipe():
    plans = plan_stages(resolve("upscale-wan-720p"))
    assert [(p.name, p.height, p.width, p.num_frames, p.start_step, p.steps_run, p.upsample) for p in plans] == [
        ("base", 480, 832, 81, 0, 50, None), ("refine", 720, 1280, 81, 15, 35, "pixel")]
    assert plans[0].sampler.flow_shift == 3.0 and plans[1].sampler.flow_shift == 9.0
    assert plans[1].sampler.guidance_scale == 5.0  # unset stage keys keep the recipe's sampler


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("stages, key, text", [
    ({"base": {"height": 1024}, "refine": {}}, "stages.refine.height", "smaller than the previous stage"),
    ({"base": {"height": 40}, "refine": {}}, "stages.base.height", "multiple of 16"),
    ({"base": {"height": 32}, "refine": {"strength": 0}}, "stages.refine.strength", "(0, 1]"),
    ({"base": {"height": 32}, "refine": {"strength": 1.5}}, "stages.refine.strength", "(0, 1]"),
    ({"base": {"height": 32, "strength": 0.5}, "refine": {}}, "stages.base.strength", "starts from noise"),
    ({"base": {"height": 32}, "refine": {"height": 48}}, "stages.refine.height", "set video.height instead"),
    ({"base": {"num_frames": 9}, "refine": {}}, "stages.refine.num_frames", "upsample: latent"),
    ({"base": {"num_frames": 10}, "refine": {}}, "stages.base.num_frames", "4k+1"),
    ({"base": {"height": 32}, "refine": {"strength": 0.05}}, "stages.refine.strength", "runs no step"),
    ({"base": {"height": 32}, "refine": {"upsampel": "latent"}}, "stages.refine.upsampel", "did you mean"),
    ({"base": {"height": 32}, "refine": {"sampler": {"steps": 0}}}, "stages.refine.sampler.steps", "at least 1"),
    ({"base": {"height": 32}, "bad name!": {}}, "stages.bad name!", "letters, digits"),
    ({"base": {"num_frames": 9}, "refine": {"upsample": "latent", "interpolation": "bicubic"}},
     "stages.refine.interpolation", "bicubic"),
])
def test_impossible_plans_are_refused_before_loading(stages, key, text):
    mapping = wan_recipe("tiny:wan", num_frames=17, height=64, width=96)
    mapping["sampler"]["steps"] = 8
    mapping["stages"] = stages
    with pytest.raises(RecipeError) as info:
        resolve(mapping)
    assert any(p.key == key and text in p.message for p in info.value.problems), info.value.problems


def test_method_scopes_name_real_stages():
    mapping = two_stage(wan_recipe("tiny:wan", height=32, width=48))
    mapping["methods"] = {"freelong": {"stages": ["refin"]}}
    with pytest.raises(RecipeError, match="methods.freelong.stages: no stage 'refin'; stages: base, refine"):
        resolve(mapping)
    mapping = wan_recipe("tiny:wan")
    mapping["methods"] = {"freelong": {"stages": ["refine"]}}
    with pytest.raises(RecipeError, match="this recipe has no stages"):
        resolve(mapping)


def test_overrides_merge_into_stages_and_keep_their_order():
    r = resolve("upscale-wan-720p", ["stages.refine.strength=0.5", "stages.extra.sampler.steps=4"])
    assert list(r.stages) == ["base", "refine", "extra"]
    assert r.stages["refine"].strength == 0.5 and r.stages["refine"].sampler.flow_shift == 9.0
    r = resolve("upscale-wan-720p", ["stages.base=null", "stages.refine.strength=1"])
    assert list(r.stages) == ["refine"]
    with pytest.raises(RecipeError, match="stages.base.height: the last stage makes the output"):
        resolve("upscale-wan-720p", ["stages.refine=null"])  # base alone would be smaller than the video


# ---------------------------------------------------------------------------------------- the hand-off


@pytest.fixture(scope="module")
def wan(tiny_wan_dir):
    adapter = runner.load_adapter(resolve(wan_recipe(tiny_wan_dir)))
    yield adapter
    adapter.close()


def test_wan_streamed_encode_equals_vae_encode_mode(wan):
    """Chunked causal encode (1 frame, then 4) == vae.encode(video).latent_dist.mode(), normalised as v2v."""
    vae = wan.pipe.vae
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    chunks = [video[:, :, :1]] + [video[:, :, i:i + 4] for i in range(1, 9, 4)]
    ours = wan.encode_stream(iter(chunks))
    with torch.no_grad():
        mode = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert ours.shape == (1, 16, 3, 4, 6)
    assert torch.equal(ours, (mode - mean) * inv_std)


def test_pixel_handoff_streams_and_equals_decode_resize_encode_at_once(wan):
    """The streamed hand-off gives the latents of decoding everything, resizing everything, encoding everything."""
    recipe = resolve(two_stage(wan_recipe("tiny:wan", height=32, width=48)))
    base, refine = plan_stages(recipe)
    x = torch.randn(1, 16, 3, 2, 4, generator=torch.Generator().manual_seed(1))  # 9 frames at 16x32
    seen = []
    ours = handoff(wan, x, refine, recipe.runtime, lambda done, total: seen.append((done, total)))
    video = torch.cat(list(wan.decode_stream(x)), dim=2)  # (1, 3, 9, 16, 32), the whole video
    whole = wan.encode_stream(iter([resize_frames(video[:, :, :1], 32, 48, "bilinear")] +
                                   [resize_frames(video[:, :, i:i + 4], 32, 48, "bilinear") for i in (1, 5)]))
    assert ours.shape == (1, 16, 3, 4, 6)
    assert torch.equal(ours, whole)
    assert seen == [(1, 9), (5, 9), (9, 9)]  # one decoded chunk at a time


def test_latent_handoff_resizes_frames_and_time():
    from longvid.core.stages import resize_latents

    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 1, 2, 3, 4)
    same_frames = resize_latents(x, (1, 1, 2, 6, 8), "nearest")
    assert torch.equal(same_frames[0, 0, 1, ::2, ::2], x[0, 0, 1])
    more_frames = resize_latents(x, (1, 1, 4, 3, 4), "nearest")
    assert torch.equal(more_frames[0, 0, 2], x[0, 0, 1])


def test_refine_loop_equals_wan_video_to_video_pipeline(tiny_wan_dir, wan):
    """From the same noised latents, longvid's loop over timesteps[start:] == WanVideoToVideoPipeline."""
    from diffusers import UniPCMultistepScheduler, WanVideoToVideoPipeline

    recipe = resolve(wan_recipe(tiny_wan_dir), ["sampler.steps=10", "sampler.flow_shift=9"])
    cond = runner.encode(wan, recipe)
    scheduler = wan.make_scheduler(recipe.sampler)
    start = start_step(10, 0.7)
    timesteps = set_timesteps(scheduler, 10, torch.device("cpu"), start)
    init = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    noisy = renoise(scheduler, init, noise, timesteps[start])
    job = StageJob(denoise=guided(wan, recipe.sampler), cond=cond, latents=noisy.clone(), scheduler=scheduler,
                   timesteps=timesteps, start=start, ctx=__import__("longvid.core.context", fromlist=["x"])
                   .GenerationContext(9, 32, 48, 3, 4, 6, total_steps=10), generator=torch.Generator())
    ours = run_stage(job)

    pipe = WanVideoToVideoPipeline.from_pretrained(tiny_wan_dir)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=9.0)
    ref = pipe(prompt="a red fox running", negative_prompt="blurry", latents=noisy.clone(), height=32, width=48,
               num_inference_steps=10, strength=0.7, guidance_scale=5.0, max_sequence_length=16,
               output_type="latent").frames
    assert ref.shape == ours.shape
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours - noisy).abs().max() > 0.1


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("family", ["wan", "wan2.2-a14b", "animatediff"])
def test_two_stage_generation_end_to_end(family, tmp_path):
    if family == "animatediff":
        mapping = two_stage(animatediff_recipe("tiny:animatediff", num_frames=8, height=32, width=40), base=(16, 24))
    else:
        mapping = two_stage(wan_recipe(f"tiny:{family}", height=32, width=48, num_frames=9))
    mapping["sampler"]["steps"] = 8 if family == "wan2.2-a14b" else 4  # 8 steps cross A14B's expert boundary
    mapping["output"] = {"dir": str(tmp_path)}
    events = []
    result = runner.generate(resolve(mapping), progress=lambda e, d, t: events.append((e, d, t)))
    sidecar = json.loads(result.path.with_suffix(".json").read_text())
    steps = mapping["sampler"]["steps"]
    refine_steps = int(steps * 0.7)
    assert [s["name"] for s in sidecar["stages"]] == ["base", "refine"]
    assert sidecar["stages"][1]["start_step"] == steps - refine_steps
    assert sidecar["stages"][1]["handoff_s"] > 0 and sidecar["stages"][0]["height"] == 16
    assert [e for e in events if e[0] == "step:refine"][-1] == ("step:refine", refine_steps, refine_steps)
    assert [e for e in events if e[0] == "step:base"][-1] == ("step:base", steps, steps)
    assert any(e[0] == "handoff:refine" for e in events)
    h, w = mapping["video"]["height"], mapping["video"]["width"]
    assert result.latents.shape[-2:] == (h // (8 if family != "animatediff" else 2),
                                         w // (8 if family != "animatediff" else 2))
    assert torch.isfinite(result.latents).all()
    again = runner.generate(resolve(result.path.with_suffix(".json"), options={"output.dir": str(tmp_path / "b")}))
    assert torch.equal(again.latents, result.latents)  # the sidecar reproduces a two-stage video


def test_methods_scoped_to_a_stage_run_only_there(tmp_path):
    """FreeLong scoped to refine: its processors exist during refine steps only, and are gone afterwards."""
    from longvid.core.processors import OpAttnProcessor

    mapping = two_stage(animatediff_recipe("tiny:animatediff", num_frames=20, height=32, width=32), base=(16, 16))
    mapping["methods"] = {"freelong": {"stages": ["refine"], "window": 8}, "freenoise": {"fusion": "none"}}
    mapping["sampler"]["steps"] = 4
    recipe = resolve(mapping)
    adapter = runner.load_adapter(recipe)
    patched = {}

    def progress(event, done, total):
        kinds = {type(s.module.processor) for s in adapter.attention_sites("temporal")}
        patched.setdefault(event, set()).update(kinds)

    try:
        result = runner.generate(recipe, adapter=adapter, write=False, progress=progress)
        after = {type(s.module.processor) for s in adapter.attention_sites("temporal")}
    finally:
        adapter.close()
    assert OpAttnProcessor not in patched["step:base"]
    assert patched["step:refine"] == {OpAttnProcessor}
    assert OpAttnProcessor not in after
    assert result.sidecar["stages"][0]["methods"] == ["freenoise"]
    assert result.sidecar["stages"][1]["methods"] == ["freelong", "freenoise"]


def test_flow_match_euler_without_scale_model_input_runs_two_stages(tmp_path):
    """FlowMatchEulerDiscreteScheduler has no scale_model_input and re-noises with scale_noise: both paths."""
    mapping = two_stage(wan_recipe("tiny:wan", height=32, width=48, num_frames=9))
    mapping["sampler"].update(steps=4, scheduler="FlowMatchEulerDiscreteScheduler")
    result = runner.generate(resolve(mapping), write=False)
    unipc = runner.generate(resolve(two_stage(wan_recipe("tiny:wan", height=32, width=48, num_frames=9)),
                                    ["sampler.steps=4"]), write=False)
    assert torch.isfinite(result.latents).all() and result.latents.shape == (1, 16, 3, 4, 6)
    assert (result.latents - unipc.latents).abs().max() > 1e-3  # really another sampler


def test_a_float16_unet_takes_the_float32_hand_off():
    """The hand-off encodes in float32; an fp16 UNet (the GPU default) must still run the refine stage."""
    mapping = two_stage(animatediff_recipe("tiny:animatediff", num_frames=8, height=32, width=32), base=(16, 16))
    mapping["model"].update(dtype="float16", text_encoder_dtype="float16")
    mapping["sampler"]["steps"] = 2
    result = runner.generate(resolve(mapping), write=False)
    assert torch.isfinite(result.latents.float()).all() and result.latents.shape[-2:] == (16, 16)
