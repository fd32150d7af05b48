"""Vanilla generation through longvid's own loop equals the diffusers pipeline on the same components."""

import pytest
import torch
from diffusers import AnimateDiffPipeline, WanPipeline

from longvid.recipe.resolve import resolve
from longvid.runner import denoise_latents, load_adapter
from tests.helpers import animatediff_recipe, frames01, wan_recipe


def _longvid_frames(mapping):
    recipe = resolve(mapping)
    adapter = load_adapter(recipe)
    try:
        latents = denoise_latents(adapter, recipe)
        return latents, frames01(adapter.decode_stream(latents))
    finally:
        adapter.close()


def test_wan_matches_wan_pipeline(tiny_wan_dir):
    mapping = wan_recipe(tiny_wan_dir)
    _, ours = _longvid_frames(mapping)
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    ref = pipe("a red fox running", negative_prompt="blurry", height=32, width=48, num_frames=9,
               num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16,
               generator=torch.Generator().manual_seed(3), output_type="pt").frames
    assert ours.shape == ref.shape == (1, 9, 3, 32, 48)
    assert (ours - ref).abs().max() <= 1e-4
    assert ref.std() > 0.01  # a real video, not a constant that would match anything


@pytest.mark.parametrize("variant", ["wan2.2-a14b", "wan2.2-ti2v"])
def test_wan22_variants_match_pipeline(tmp_path, variant):
    from longvid.models import tiny

    pipe = tiny.build(variant)
    pipe.save_pretrained(tmp_path)
    steps = 8 if variant == "wan2.2-a14b" else 3  # 8 steps cross the A14B expert boundary (0.875)
    mapping = wan_recipe(tmp_path, height=64, width=64)
    second = {"guidance_scale_2": 3.0} if variant == "wan2.2-a14b" else {}
    mapping["sampler"].update(steps=steps, **second)
    _, ours = _longvid_frames(mapping)
    ref = WanPipeline.from_pretrained(tmp_path)(
        "a red fox running", negative_prompt="blurry", height=64, width=64, num_frames=9,
        num_inference_steps=steps, guidance_scale=5.0, max_sequence_length=16,
        generator=torch.Generator().manual_seed(3), output_type="pt", **second).frames
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-4


def test_animatediff_matches_animatediff_pipeline(tiny_animatediff_dir):
    _, ours = _longvid_frames(animatediff_recipe(tiny_animatediff_dir))
    pipe = AnimateDiffPipeline.from_pretrained(tiny_animatediff_dir)
    ref = pipe("a red fox running", negative_prompt="blurry", height=32, width=32, num_frames=8,
               num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
               output_type="pt").frames
    assert ours.shape == ref.shape == (1, 8, 3, 32, 32)
    assert (ours - ref).abs().max() <= 1e-4
    assert ref.std() > 0.001


def test_same_seed_same_latents_other_seed_different(tiny_wan_dir):
    mapping = wan_recipe(tiny_wan_dir)
    recipe = resolve(mapping)
    adapter = load_adapter(recipe)
    try:
        a = denoise_latents(adapter, recipe)
        b = denoise_latents(adapter, recipe)
        c = denoise_latents(adapter, resolve(mapping, ["seed=4"]))
    finally:
        adapter.close()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_adapters_describe_sites_and_keep_layouts_current(tiny_animatediff_dir, tiny_wan_dir):
    """Methods rely on the adapter's site kinds and live (B, F, H, W) layouts, at any size."""
    recipe = resolve(animatediff_recipe(tiny_animatediff_dir, num_frames=12, height=48, width=32))
    adapter = load_adapter(recipe)
    try:
        sites = adapter.attention_sites()
        kinds = {s.kind for s in sites}
        assert kinds == {"temporal", "spatial", "cross"}
        for kind in kinds:  # per-kind layer indices 0..n-1 in model order, all in the UNet
            assert [s.layer for s in adapter.attention_sites(kind)] == list(range(len(adapter.attention_sites(kind))))
        assert {s.denoiser for s in sites} == {"unet"}
        denoise_latents(adapter, recipe)
        full_res = [s for s in sites if s.level == 0 and s.kind in ("temporal", "spatial")]
        # CFG batch 2, 12 frames, 48x32 px -> 24x16 latents at level 0 (the tiny VAE downsamples 2x)
        assert {(s.layout.kind, s.layout.batch, s.layout.frames, s.layout.height, s.layout.width)
                for s in full_res} == {("temporal", 2, 12, 24, 16), ("spatial", 2, 12, 24, 16)}
    finally:
        adapter.close()
    recipe = resolve(wan_recipe(tiny_wan_dir, num_frames=13, height=32, width=64))
    adapter = load_adapter(recipe)
    try:
        denoise_latents(adapter, recipe)
        layouts = {s.layout for s in adapter.attention_sites()}
        assert len(adapter.attention_sites("full")) == len(adapter.attention_sites("cross")) == 2
        # 13 frames -> 4 latent frames; 32x64 px -> 4x8 latents -> 2x4 tokens after the 2x2 patch
        assert {(l.batch, l.frames, l.height, l.width) for l in layouts} == {(1, 4, 2, 4)}
        assert adapter.rope_modules == {"transformer": adapter.pipe.transformer.rope}
    finally:
        adapter.close()
