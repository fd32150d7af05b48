"""``runtime.compile: blocks``: diffusers' regional compilation of the denoiser's repeated blocks (Wan). The compiled
model gives the eager model's video (inductor may reorder float sums), with and without a method's processors, and
the setting is a load key refused where a family has no repeated blocks."""

import pytest
import torch

from longvid import runner
from longvid.errors import RecipeError
from longvid.recipe.resolve import resolve

SHORT = ["video.num_frames=9", "video.height=32", "video.width=48", "sampler.steps=2"]


def test_compiled_blocks_give_the_eager_video():
    torch._dynamo.reset()
    eager = runner.generate(resolve("demo", SHORT), write=False).latents
    recipe = resolve("demo", [*SHORT, "runtime.compile=blocks"])
    adapter = runner.load_adapter(recipe)
    try:
        blocks = adapter.pipe.transformer.blocks
        assert all(b._compiled_call_impl is not None for b in blocks)  # every block is compiled, once per class
        from torch._dynamo.utils import counters

        counters.clear()
        compiled = runner.generate(recipe, adapter=adapter, write=False).latents
        assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the blocks (no silent eager run)
    finally:
        adapter.close()
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5) and not torch.equal(compiled, torch.zeros_like(eager))
    assert adapter.load_key["runtime.compile"] == "blocks"


def test_compile_is_refused_where_there_are_no_repeated_blocks():
    with pytest.raises(RecipeError, match="runtime.compile: animatediff declares no repeated blocks"):
        resolve("freenoise-animatediff-64", ["runtime.compile=blocks"])
    with pytest.raises(RecipeError, match="runtime.compile"):
        resolve("demo", ["runtime.compile=everything"])
