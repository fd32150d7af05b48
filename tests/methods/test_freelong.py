"""FreeLong as a method: vanilla equivalence, generation on both families, knobs, restore, validation."""

import pytest
import torch

from longvid.core.context import GenerationContext
from longvid.core.processors import OpAttnProcessor
from longvid.errors import MethodError, RecipeError
from longvid.methods.base import applied
from longvid.recipe.resolve import resolve
from longvid.runner import build_methods, denoise_latents, load_adapter
from tests.helpers import animatediff_recipe, wan_recipe


@pytest.fixture(scope="module")
def animatediff(tiny_animatediff_dir):
    recipe = resolve(animatediff_recipe(tiny_animatediff_dir))
    adapter = load_adapter(recipe)
    yield adapter
    adapter.close()


@pytest.fixture(scope="module")
def wan(tiny_wan_dir):
    recipe = resolve(wan_recipe(tiny_wan_dir, num_frames=33))
    adapter = load_adapter(recipe)
    yield adapter
    adapter.close()


def _latents(adapter, mapping):
    recipe = resolve(mapping)
    return denoise_latents(adapter, recipe)


def test_frames_within_window_is_vanilla_on_both_families(animatediff, wan, tiny_animatediff_dir, tiny_wan_dir):
    m = animatediff_recipe(tiny_animatediff_dir, num_frames=16)
    vanilla = _latents(animatediff, m)
    assert torch.equal(_latents(animatediff, dict(m, methods={"freelong": {"full_resolution": "blend"}})), vanilla)
    w = wan_recipe(tiny_wan_dir, num_frames=17)
    vanilla = _latents(wan, w)
    assert torch.equal(_latents(wan, dict(w, methods={"freelong": {"window": 17}})), vanilla)


def test_long_animatediff_generation_and_official_full_resolution_level(animatediff, tiny_animatediff_dir):
    m = animatediff_recipe(tiny_animatediff_dir, num_frames=40)
    m["methods"] = {"freelong": {}, "freenoise": {"fusion": "none"}}
    recipe = resolve(m)
    adapter = animatediff
    ctx = GenerationContext(40, 32, 32, 40, 4, 4, total_steps=3)
    with applied(build_methods(recipe), adapter, ctx):
        ops = {s.name: s.module.processor.op.op for s in adapter.attention_sites("temporal")}
    levels = {s.name: s.level for s in adapter.attention_sites("temporal")}
    assert {n for n, op in ops.items() if op.local_only} == {n for n, lvl in levels.items() if lvl == 0}
    assert any(not op.local_only for op in ops.values())
    assert not any(isinstance(s.module.processor, OpAttnProcessor) for s in adapter.attention_sites("temporal"))
    freelong = denoise_latents(adapter, recipe)
    m["methods"] = {"freenoise": {"fusion": "block"}}
    freenoise = _latents(adapter, m)
    assert torch.isfinite(freelong).all()
    assert (freelong - freenoise).abs().max() > 1e-3  # same noise, different attention


def test_wan_generation_knobs_and_restore(wan, tiny_wan_dir):
    base = wan_recipe(tiny_wan_dir, num_frames=33)  # 9 latent frames
    vanilla = _latents(wan, base)
    full = _latents(wan, dict(base, methods={"freelong": {"window": 9}}))  # local window 3 latent frames
    late = _latents(wan, dict(base, methods={"freelong": {"window": 9, "steps": [0.5, 1.0]}}))
    one_layer = _latents(wan, dict(base, methods={"freelong": {"window": 9, "layers": [1]}}))
    for other in (full, late, one_layer):
        assert torch.isfinite(other).all() and (other - vanilla).abs().max() > 1e-4
    assert (late - full).abs().max() > 1e-4 and (one_layer - full).abs().max() > 1e-4
    assert torch.equal(_latents(wan, base), vanilla)  # apply -> remove restored the model bit-exactly


def test_layers_out_of_range_is_a_method_error(wan, tiny_wan_dir):
    with pytest.raises(MethodError, match="methods.freelong.layers"):
        _latents(wan, dict(wan_recipe(tiny_wan_dir), methods={"freelong": {"layers": [5]}}))


@pytest.mark.parametrize("methods, key", [
    ({"freelong": {}, "freenoise": {"fusion": "denoiser"}}, "methods.freelong"),
    ({"freelong": {"window": 80}}, "methods.freelong.window"),
    ({"freelong": {"steps": [0.8, 0.2]}}, "methods.freelong"),
    ({"freelong": {"d_s": -1.0}}, "methods.freelong"),
    ({"freelong": {"grid": "centred"}}, "methods.freelong.grid"),
])
def test_validation(methods, key):
    with pytest.raises(RecipeError) as err:
        resolve("demo", options={"methods": methods})
    assert key in str(err.value)
