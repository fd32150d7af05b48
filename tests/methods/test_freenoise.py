"""FreeNoise as a method: parity with diffusers' enable_free_noise, vanilla equivalences, Wan windows."""

import pytest
import torch
from diffusers import AnimateDiffPipeline

from longvid.errors import RecipeError
from longvid.recipe.resolve import resolve
from longvid.core.guidance import guided
from longvid.runner import build_methods, denoise_latents, load_adapter
from tests.helpers import animatediff_recipe, frames01, wan_recipe


def _run(mapping, adapter=None):
    recipe = resolve(mapping)
    own = adapter is None
    adapter = adapter or load_adapter(recipe)
    try:
        latents = denoise_latents(adapter, recipe)
        return latents, frames01(adapter.decode_stream(latents))
    finally:
        if own:
            adapter.close()


def _diffusers_free_noise(path, frames, prompt="a red fox running"):
    pipe = AnimateDiffPipeline.from_pretrained(path)
    pipe.enable_free_noise(context_length=16, context_stride=4, weighting_scheme="pyramid",
                           noise_type="shuffle_context")
    return pipe(prompt, negative_prompt="blurry", height=32, width=32, num_frames=frames, num_inference_steps=3,
                guidance_scale=7.5, generator=torch.Generator().manual_seed(3), output_type="pt").frames


@pytest.mark.parametrize("frames", [24, 25])  # (F-16) % 4 in {0, 1}: where diffusers' tail weighting is right
def test_block_fusion_equals_diffusers_enable_free_noise(tiny_animatediff_dir, frames):
    mapping = animatediff_recipe(tiny_animatediff_dir, num_frames=frames)
    mapping["methods"] = {"freenoise": {"fusion": "block", "window": 16, "stride": 4}}
    _, ours = _run(mapping)
    ref = _diffusers_free_noise(tiny_animatediff_dir, frames)
    assert ours.shape == ref.shape == (1, frames, 3, 32, 32)
    assert (ours - ref).abs().max() <= 1e-4


def test_multi_prompt_equals_diffusers_prompt_dict(tiny_animatediff_dir):
    prompts = {0: "a calm lake", 12: "a storm over the lake"}
    mapping = animatediff_recipe(tiny_animatediff_dir, num_frames=24)
    mapping["prompt"] = prompts
    mapping["methods"] = {"freenoise": {}}
    _, ours = _run(mapping)
    ref = _diffusers_free_noise(tiny_animatediff_dir, 24, prompt=prompts)
    assert (ours - ref).abs().max() <= 1e-4
    single = dict(mapping, prompt="a calm lake")
    _, one = _run(single)
    assert (ours - one).abs().max() > 1e-3  # the second prompt changes the video


def test_tail_frames_differ_from_diffusers_bug(tiny_animatediff_dir):
    """F=26: diffusers halves the last frame's state in every motion block; longvid does not."""
    mapping = animatediff_recipe(tiny_animatediff_dir, num_frames=26)
    mapping["methods"] = {"freenoise": {"fusion": "block"}}
    _, ours = _run(mapping)
    ref = _diffusers_free_noise(tiny_animatediff_dir, 26)
    head = (ours[:, :20] - ref[:, :20]).abs().max()
    tail = (ours[:, -1] - ref[:, -1]).abs().max()
    assert tail > 10 * max(head, 1e-6)


@pytest.mark.parametrize("fusion", ["block", "layer"])
def test_window_equals_frames_is_vanilla(tiny_animatediff_dir, fusion):
    mapping = animatediff_recipe(tiny_animatediff_dir, num_frames=16)
    vanilla, _ = _run(mapping)
    mapping["methods"] = {"freenoise": {"fusion": fusion}}
    fused, _ = _run(mapping)
    assert (vanilla - fused).abs().max() <= 1e-4 * vanilla.abs().max()  # fp32 rounding of W(x+p) = Wx + Wp


def test_layer_fusion_beyond_motion_limit(tiny_animatediff_dir):
    """40 frames > the motion module's 32 positions: windows keep positions window-local."""
    mapping = animatediff_recipe(tiny_animatediff_dir, num_frames=40)
    mapping["methods"] = {"freenoise": {"fusion": "layer"}}
    layer, video = _run(mapping)
    mapping["methods"] = {"freenoise": {"fusion": "block"}}
    block, _ = _run(mapping)
    assert torch.isfinite(video).all() and video.shape[1] == 40
    assert 1e-4 < (layer - block).abs().max() < 10  # different granularity, same noise: close but not equal


def test_wan_window_covering_all_frames_is_vanilla_and_remove_restores(tiny_wan_dir):
    mapping = wan_recipe(tiny_wan_dir, num_frames=17)  # 5 latent frames
    recipe = resolve(mapping)
    adapter = load_adapter(recipe)
    try:
        vanilla = denoise_latents(adapter, recipe)
        windowed = dict(mapping, methods={"freenoise": {"window": 17, "noise": "gaussian"}})
        assert torch.equal(denoise_latents(adapter, resolve(windowed)), vanilla)
        small = dict(mapping, methods={"freenoise": {"window": 9, "stride": 4}})  # 3 latent frames, stride 1
        changed = denoise_latents(adapter, resolve(small))
        assert (changed - vanilla).abs().max() > 1e-3
        assert torch.equal(denoise_latents(adapter, recipe), vanilla)  # apply -> remove restored the model
    finally:
        adapter.close()


def test_wan_windows_see_window_length_and_local_positions(tiny_wan_dir):
    """321 frames = 81 latent; with window 81 (21 latent) every transformer call sees 21 frames."""
    mapping = wan_recipe(tiny_wan_dir, num_frames=321, height=16, width=16)
    mapping["methods"] = {"freenoise": {}}
    mapping["sampler"]["steps"] = 1
    recipe = resolve(mapping)
    adapter = load_adapter(recipe)
    seen = []
    hook = adapter.pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["hidden_states"].shape[2]), with_kwargs=True)
    try:
        latents = denoise_latents(adapter, recipe)
    finally:
        hook.remove()
        adapter.close()
    assert set(seen) == {21}
    assert len(seen) == 2 * 7  # cond + uncond for views starting 0, 10, ..., 60
    assert latents.shape[2] == 81 and torch.isfinite(latents).all()


def test_wan_multi_prompt_assigns_one_prompt_per_window(tiny_wan_dir):
    mapping = wan_recipe(tiny_wan_dir, num_frames=33, height=16, width=16)
    mapping["prompt"] = {0: "a calm lake at dawn", 20: "a storm over the lake"}
    mapping["methods"] = {"freenoise": {"window": 17, "stride": 8}}  # latent windows 5, stride 2
    recipe = resolve(mapping)
    adapter = load_adapter(recipe)
    texts = []
    denoise = guided(adapter, recipe.sampler)
    spy = lambda x, t, cond: texts.append(cond.positive.sum().item()) or denoise(x, t, cond)  # noqa: E731
    try:
        method = build_methods(recipe)[0]
        fused = method.wrap_denoiser(spy, adapter, None)
        cond = __import__("longvid.runner", fromlist=["encode"]).encode(adapter, recipe)
        fused(torch.zeros(1, 16, 9, 2, 2), torch.tensor(999.0), cond)
    finally:
        adapter.close()
    first, second = (cond.keyframes[k].positive.sum().item() for k in (0, 20))
    # latent views (0,5) (2,7) (4,9) = video frames 0-16, 5-24, 13-32: most of the last one is after frame 20
    assert texts == [first, first, second]


@pytest.mark.parametrize("override, key", [
    (["methods.freenoise.window=80"], "methods.freenoise.window"),
    (["methods.freenoise.fusion=layer"], "methods.freenoise.fusion"),
    (["methods.freenoise.stride=6"], "methods.freenoise.stride"),
    (["methods.freenoise.windw=81"], "methods.freenoise.windw"),
])
def test_wan_freenoise_validation(override, key):
    with pytest.raises(RecipeError) as err:
        resolve("demo", ["methods.freenoise={}"] + override)
    assert str(err.value).count(key) >= 1


def test_motion_injection_schedule_scales_with_steps(tiny_animatediff_dir):
    """Encoder/middle cross-attention of the cond pass sees the last prompt outside [a, b); decoder never."""
    mapping = animatediff_recipe(tiny_animatediff_dir, num_frames=20)
    mapping["prompt"] = {0: "a calm lake", 10: "a storm over the lake"}
    mapping["sampler"]["steps"] = 10
    mapping["methods"] = {"freenoise": {"injection": True, "injection_steps": [0.1, 0.35]}}
    recipe = resolve(mapping)
    adapter = load_adapter(recipe)
    seen = {}  # (step, part) -> context rows of the cond pass
    ctx_holder = {}
    hooks = []
    for site in adapter.attention_sites("cross"):
        def spy(module, args, part=site.part):  # the context rows the key projection really sees
            seen.setdefault((ctx_holder["ctx"].step, part), args[0][-20:].clone())
        hooks.append(site.module.to_k.register_forward_pre_hook(spy))
    from longvid import runner

    original = runner.GenerationContext

    def capture(*args, **kwargs):
        ctx_holder["ctx"] = original(*args, **kwargs)
        return ctx_holder["ctx"]

    runner.GenerationContext = capture
    try:
        latents = denoise_latents(adapter, recipe)
        cond = runner.encode(adapter, recipe)
    finally:
        runner.GenerationContext = original
        for h in hooks:
            h.remove()
        adapter.close()
    last = cond.keyframes[10].positive[0]
    first = cond.keyframes[0].positive[0]
    for step in range(10):
        injected = not 0.1 <= step / 10 < 0.35  # steps 1, 2, 3 keep per-frame prompts
        encoder = seen[(step, "encoder")]
        assert torch.equal(encoder[0], last) == injected, step
        assert torch.equal(seen[(step, "decoder")][0], first)  # decoder: per-frame prompts (frame 0 = first)
    assert torch.isfinite(latents).all()


def test_default_injection_window_is_the_official_schedule():
    """Official FreeNoise: per-frame prompts at steps 5..15 of 50; the default [0.1, 0.32) says exactly that."""
    from longvid.core.context import GenerationContext
    from longvid.core.processors import in_step_window
    from longvid.methods.freenoise import FreeNoiseConfig

    a, b = FreeNoiseConfig().injection_steps
    ctx = GenerationContext(16, 64, 64, 16, 8, 8, total_steps=50)
    inside = [i for i in range(50) if (setattr(ctx, "step", i) or in_step_window(ctx, a, b))]
    assert inside == list(range(5, 16))


def test_motion_injection_needs_multi_prompt_on_a_unet():
    with pytest.raises(RecipeError, match="methods.freenoise.injection"):
        resolve("freenoise-animatediff-64", ["methods.freenoise.injection=true"])


def test_the_sidecar_lists_the_window_seams_and_metrics_measures_there(tmp_path):
    from longvid import runner
    from longvid.eval.metrics import measure_path

    # Wan 4x: 81 latent frames, windows of 21 latent frames every 10: (0, 21), (10, 31), ..., (60, 81)
    bounds = sorted({10 * k for k in range(1, 7)} | {10 * k + 21 for k in range(0, 6)})
    assert runner._seams(resolve("freenoise-wan-4x")) == [4 * (b - 1) + 1 for b in bounds]  # pixel frames
    assert runner._seams(resolve("freenoise-animatediff-64")) == list(range(4, 64, 4))  # UNet frames, stride 4
    assert runner._seams(resolve("freenoise-wan-4x", ["methods.freenoise.fusion=none"])) == []  # noise only
    assert runner._seams(resolve("freelong-wan-4x")) == []  # a soft blend: no hard window
    # stages: only the methods of stages at the output's frame count put seams on its frames
    staged = ["video.num_frames=161", "stages={base: {num_frames: 81}, refine: {strength: 0.7, upsample: latent}}"]
    assert runner._seams(resolve("freenoise-wan-4x", [*staged, "methods.freenoise.stages=[base]"])) == []
    assert runner._seams(resolve("freenoise-wan-4x", staged)) == [37, 77, 81, 121]  # the refine stage's windows
    recipe = resolve("demo", ["methods.freenoise={}", "methods.freenoise.window=9", "methods.freenoise.stride=4",
                              "video.num_frames=17", "video.height=32", "video.width=48", "sampler.steps=2",
                              f"output.dir={tmp_path}"])
    result = runner.generate(recipe)
    assert result.sidecar["seams"] == [1, 5, 9, 13]  # latent views (0, 3), (1, 4), (2, 5)
    from longvid.eval.metrics import measure

    measured = measure_path(result.path)
    assert measured["seams"] == [1, 5, 9, 13]
    assert measured["seam_score"] == measure(result.path, seams=[1, 5, 9, 13])["seam_score"] > 0
