"""UltraViCo as a method on Wan: the gate, layers, any grid, and a real generation."""

import pytest
import torch

from longvid import runner
from longvid.core.context import GenerationContext
from longvid.errors import MethodError, RecipeError
from longvid.methods.base import applied
from longvid.models.wan import WanOpProcessor
from longvid.recipe.resolve import resolve
from tests.helpers import wan_recipe


@pytest.fixture(scope="module")
def wan():
    adapter = runner.load_adapter(resolve(wan_recipe("tiny:wan")))
    yield adapter
    adapter.close()


def _patched(adapter, methods, frames):
    recipe = resolve(dict(wan_recipe("tiny:wan", num_frames=frames), methods=methods))
    ctx = GenerationContext(frames, 32, 48, adapter.spec.latent_frames(frames), 4, 6)
    with applied(runner.build_methods(recipe), adapter, ctx):
        return sorted(s.layer for s in adapter.attention_sites("full") if isinstance(s.module.processor, WanOpProcessor))


def test_gate_and_layers(wan):
    assert _patched(wan, {"ultravico": {}}, 81) == []  # 21 latent frames: within training, untouched
    assert _patched(wan, {"ultravico": {"gate": False}}, 81) == [0, 1]  # official: always
    assert _patched(wan, {"ultravico": {}}, 161) == [0, 1]
    assert _patched(wan, {"ultravico": {"layers": [1]}}, 161) == [1]
    with pytest.raises(MethodError, match="methods.ultravico.layers"):
        _patched(wan, {"ultravico": {"layers": [7]}}, 161)


def test_generation_beyond_the_training_length_changes_and_remove_restores(wan):
    def run(methods, frames=161):
        mapping = dict(wan_recipe("tiny:wan", num_frames=frames, height=32, width=64), methods=methods)
        return runner.generate(resolve(mapping, ["sampler.steps=2"]), adapter=wan, write=False).latents

    vanilla = run({})
    decayed = run({"ultravico": {}})
    frame_rule = run({"ultravico": {"rule": "frame"}})
    assert torch.isfinite(decayed).all() and (decayed - vanilla).abs().max() > 1e-4
    assert (frame_rule - decayed).abs().max() > 0  # the two far rules differ at two frame distances
    assert torch.equal(run({}), vanilla)
    assert torch.equal(run({"ultravico": {}}, frames=81), run({}, frames=81))  # gated at the native length


@pytest.mark.parametrize("settings, key", [({"alpha": 0}, "methods.ultravico"), ({"rule": "tokens"}, "rule"),
                                           ({"steps": [0.5, 0.2]}, "methods.ultravico")])
def test_validation(settings, key):
    with pytest.raises(RecipeError) as info:
        resolve(dict(wan_recipe("tiny:wan", num_frames=161), methods={"ultravico": settings}))
    assert key in str(info.value)
    with pytest.raises(RecipeError, match="patches the same full attention sites"):
        resolve(dict(wan_recipe("tiny:wan", num_frames=161), methods={"ultravico": {}, "freelong": {}}))
