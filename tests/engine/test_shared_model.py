"""One loaded model serves many runs: every per-run setting comes from the run's recipe, never the loaded one."""

import pytest
import torch

import longvid
from longvid import runner
from longvid.errors import RecipeError
from longvid.recipe.resolve import resolve
from tests.helpers import animatediff_recipe, wan_recipe


def _latents(recipe, adapter=None):
    return runner.generate(recipe, adapter=adapter, write=False).latents


def test_second_recipe_on_a_loaded_wan_equals_a_fresh_load(tiny_wan_dir):
    """The bug this fixes: guidance, flow shift and text length used to come from the recipe the model was
    loaded with, so B's latents equalled A's while B's sidecar recorded B's settings."""
    a = resolve(wan_recipe(tiny_wan_dir))
    b = resolve(wan_recipe(tiny_wan_dir), ["sampler.guidance_scale=1", "sampler.flow_shift=9",
                                            "sampler.max_sequence_length=8"])
    adapter = runner.load_adapter(a)
    try:
        first = _latents(a, adapter)
        shared = _latents(b, adapter)
        again = _latents(a, adapter)
    finally:
        adapter.close()
    fresh = _latents(b)
    assert torch.equal(shared, fresh)
    assert torch.equal(again, first)
    assert (shared - first).abs().max() > 1e-2  # B really is different from A


def test_second_recipe_on_a_loaded_animatediff_equals_a_fresh_load(tiny_animatediff_dir):
    a = resolve(animatediff_recipe(tiny_animatediff_dir))
    b = resolve(animatediff_recipe(tiny_animatediff_dir), ["sampler.guidance_scale=1.0", "sampler.eta=0.7",
                                                           "runtime.decode_chunk=3", "seed=9"])
    adapter = runner.load_adapter(a)
    try:
        _latents(a, adapter)
        shared = runner.generate(b, adapter=adapter, write=False)
    finally:
        adapter.close()
    fresh = runner.generate(b, write=False)
    assert torch.equal(shared.latents, fresh.latents)
    assert shared.sidecar["recipe"]["sampler"]["eta"] == 0.7


def test_python_load_then_generate_many(tiny_wan_dir, tmp_path):
    base = wan_recipe(tiny_wan_dir, num_frames=5)
    with longvid.load(base) as model:
        results = [model.generate(base, ["sampler.steps=2"], prompt=p, seed=7, write=False)
                   for p in ("a fox", "a lighthouse in a storm")]
        freelong = model.generate(dict(base, methods={"freelong": {"window": 1}}), ["sampler.steps=2"],
                                  prompt="a fox", seed=7, out_dir=str(tmp_path), name="fl")
    for prompt, result in zip(("a fox", "a lighthouse in a storm"), results):
        fresh = longvid.generate(base, ["sampler.steps=2"], prompt=prompt, seed=7, write=False)
        assert torch.equal(result.latents, fresh.latents)
    assert not torch.equal(results[0].latents, results[1].latents)
    fresh = longvid.generate(dict(base, methods={"freelong": {"window": 1}}), ["sampler.steps=2"], prompt="a fox",
                             seed=7, write=False)
    assert torch.equal(freelong.latents, fresh.latents) and freelong.path == tmp_path / "fl.mp4"


@pytest.mark.parametrize("override, key", [
    ("model.vae_dtype=bfloat16", "model.vae_dtype"),
    ("model.dtype=bfloat16", "model.dtype"),
    ("runtime.offload=model", "runtime.offload"),
])
def test_a_recipe_with_another_load_key_is_refused_before_any_work(tiny_wan_dir, override, key):
    a = resolve(wan_recipe(tiny_wan_dir))
    adapter = runner.load_adapter(a)
    calls = []
    adapter.predict = lambda *args, **kwargs: calls.append(args)  # any denoising would show up here
    try:
        with pytest.raises(RecipeError) as info:
            runner.generate(resolve(wan_recipe(tiny_wan_dir), [override]), adapter=adapter, write=False)
    finally:
        adapter.close()
    message = str(info.value)
    assert message.startswith(f"{key}: this loaded model has") and "\n" not in message
    assert calls == []


def test_another_path_is_refused(tiny_wan_dir, tiny_animatediff_dir):
    adapter = runner.load_adapter(resolve(wan_recipe(tiny_wan_dir)))
    try:
        with pytest.raises(RecipeError, match="^model.path: this loaded model has"):
            runner.generate(resolve(wan_recipe("tiny:wan")), adapter=adapter, write=False)
    finally:
        adapter.close()
