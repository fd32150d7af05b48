"""``runtime.layerwise_casting``: the denoisers' weights stored in fp8 and upcast layer by layer (diffusers'
``enable_layerwise_casting``). Results stay close to full precision, the weights take less memory, and the attention
fast paths that read raw weights (Wan's grouped projections, AnimateDiff's block fusion) call the layers instead,
so the upcast happens; a model loaded without fp8 is not reused for a recipe that asks for it."""

import pytest
import torch

from longvid import runner
from longvid.errors import RecipeError
from longvid.recipe.resolve import resolve
from tests.helpers import animatediff_recipe

LONG = ["video.num_frames=97", "video.height=32", "video.width=48", "sampler.steps=3", "methods.ultravico={}"]


def _weights(module: torch.nn.Module) -> tuple[int, set]:
    return sum(p.numel() * p.element_size() for p in module.parameters()), {p.dtype for p in module.parameters()}


def _run(recipe):
    adapter = runner.load_adapter(recipe)
    try:
        return runner.generate(recipe, adapter=adapter, write=False).latents, _weights(adapter.denoisers[0]), adapter
    finally:
        adapter.close()


def test_wan_in_fp8_storage_is_close_to_full_precision_with_an_attention_op_active():
    full, (full_bytes, _), _ = _run(resolve("demo", LONG))
    fp8, (fp8_bytes, dtypes), adapter = _run(resolve("demo", [*LONG, "runtime.layerwise_casting=float8_e4m3fn"]))
    assert dtypes == {torch.float32, torch.float8_e4m3fn}  # linear weights in fp8; embeddings and norms as loaded
    assert all(block.attn1.to_v.weight.dtype == torch.float8_e4m3fn for block in adapter.pipe.transformer.blocks)
    assert fp8_bytes < 0.6 * full_bytes  # tiny model: its embeddings are a large share; real ones get near 0.25
    rel = ((fp8 - full).norm() / full.norm()).item()
    assert 1e-4 < rel < 0.05  # fp8 rounding, not a different computation


@pytest.mark.parametrize("fusion", ["block", "layer"])
def test_animatediff_freenoise_fusion_in_fp8_storage(tiny_animatediff_dir, fusion):
    base = animatediff_recipe(tiny_animatediff_dir, num_frames=24)
    base["methods"] = {"freenoise": {"window": 16, "stride": 4, "fusion": fusion}}
    full, _, _ = _run(resolve(base))
    fp8, (_, dtypes), _ = _run(resolve({**base, "runtime": {**base["runtime"], "layerwise_casting": "float8_e5m2"}}))
    assert torch.float8_e5m2 in dtypes
    rel = ((fp8 - full).norm() / full.norm()).item()
    assert 1e-4 < rel < 0.1


def test_fp8_storage_is_part_of_the_load_key_and_refused_where_it_is_not_built():
    plain = resolve("demo", ["sampler.steps=1"])
    fp8 = resolve("demo", ["sampler.steps=1", "runtime.layerwise_casting=float8_e4m3fn"])
    adapter = runner.load_adapter(plain)
    try:
        with pytest.raises(Exception, match="layerwise_casting"):
            runner.generate(fp8, adapter=adapter, write=False)
    finally:
        adapter.close()
    with pytest.raises(RecipeError, match="runtime.layerwise_casting: not available for Pyramid Flow"):
        resolve("pyramid-flow-miniflux-384p", ["runtime.layerwise_casting=float8_e4m3fn"])
    with pytest.raises(RecipeError, match="runtime.layerwise_casting"):
        resolve("demo", ["runtime.layerwise_casting=int4"])
