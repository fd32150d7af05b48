"""Guidance is one wrapper over an unguided prediction: branch order, batching, per-expert scales, ctx."""

import pytest
import torch

from longvid.core.context import GenerationContext
from longvid.core.guidance import expert_scales, guided
from longvid.models.base import Conditioning
from longvid.recipe.schema import SamplerConfig


class FakeAdapter:
    """predict = x * 2 + mean(embeds), so cond and uncond differ; records (branch, batch) of each call."""

    def __init__(self, batched: bool, experts: int = 1, boundary: float = 500.0):
        self.batched_cfg = batched
        self.experts, self.boundary = experts, boundary
        self.calls = []
        self.ctx = None

    def expert(self, t):
        return 0 if self.experts == 1 or t >= self.boundary else 1

    def predict(self, x, t, embeds, expert=0):
        self.calls.append((self.ctx.cfg_branch if self.ctx else None, x.shape[0], expert))
        return x * 2 + embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def _cond():
    return Conditioning(torch.full((1, 3, 4), 1.0), torch.full((1, 3, 4), -1.0))


@pytest.mark.parametrize("batched", [True, False])
def test_guidance_combines_branches_and_sets_cfg_branch(batched):
    adapter = FakeAdapter(batched)
    ctx = adapter.ctx = GenerationContext(5, 8, 8, 5, 1, 1)
    denoise = guided(adapter, SamplerConfig(guidance_scale=4.0), ctx)
    x = torch.randn(1, 2, 5, 1, 1)
    out = denoise(x, torch.tensor(900.0), _cond())
    cond, uncond = x * 2 + 1, x * 2 - 1
    assert torch.allclose(out, uncond + 4.0 * (cond - uncond))
    expected = [("both", 2, 0)] if batched else [("cond", 1, 0), ("uncond", 1, 0)]
    assert adapter.calls == expected


def test_no_guidance_is_one_cond_call():
    adapter = FakeAdapter(batched=True)
    ctx = adapter.ctx = GenerationContext(5, 8, 8, 5, 1, 1)
    x = torch.randn(1, 2, 5, 1, 1)
    out = guided(adapter, SamplerConfig(guidance_scale=1.0), ctx)(x, torch.tensor(1.0), _cond())
    assert torch.equal(out, x * 2 + 1) and adapter.calls == [("cond", 1, 0)]
    out = guided(adapter, SamplerConfig(guidance_scale=3.0), ctx)(x, torch.tensor(1.0), Conditioning(_cond().positive, None))
    assert torch.equal(out, x * 2 + 1)  # no negative embedding: nothing to guide with


def test_second_expert_uses_guidance_scale_2():
    adapter = FakeAdapter(batched=False, experts=2)
    adapter.ctx = GenerationContext(5, 8, 8, 5, 1, 1)
    denoise = guided(adapter, SamplerConfig(guidance_scale=4.0, guidance_scale_2=2.0), adapter.ctx)
    x = torch.zeros(1, 1, 1, 1, 1)
    high = denoise(x, torch.tensor(900.0), _cond())  # expert 0: scale 4 -> -1 + 4 * 2 = 7
    low = denoise(x, torch.tensor(100.0), _cond())  # expert 1: scale 2 -> 3
    assert high.item() == 7.0 and low.item() == 3.0
    assert [c[2] for c in adapter.calls] == [0, 0, 1, 1]
    assert expert_scales(SamplerConfig(guidance_scale=5.0)) == (5.0, 5.0)


@pytest.mark.parametrize("g1, g2, expected_high, expected_low", [
    (5.0, 0.8, 9.0, 0.6),   # CFG on: the low-noise expert blends with 0.8 (WanPipeline does), -1 + 0.8 * 2
    (1.0, 5.0, 1.0, 1.0),   # CFG off: guidance_scale alone decides, for both experts (cond only)
])
def test_cfg_on_or_off_follows_guidance_scale_alone(g1, g2, expected_high, expected_low):
    adapter = FakeAdapter(batched=False, experts=2)
    adapter.ctx = GenerationContext(5, 8, 8, 5, 1, 1)
    denoise = guided(adapter, SamplerConfig(guidance_scale=g1, guidance_scale_2=g2), adapter.ctx)
    x = torch.zeros(1, 1, 1, 1, 1)
    assert denoise(x, torch.tensor(900.0), _cond()).item() == pytest.approx(expected_high)
    assert denoise(x, torch.tensor(100.0), _cond()).item() == pytest.approx(expected_low)


def test_wan_guidance_order_through_the_real_model(tiny_wan_dir):
    """Wan runs cond then uncond (WanPipeline's order); an op sees ctx.cfg_branch of the call it is in."""
    from longvid import runner
    from longvid.core.processors import sdpa
    from longvid.recipe.resolve import resolve
    from tests.helpers import wan_recipe

    recipe = resolve(wan_recipe(tiny_wan_dir), ["sampler.steps=2"])
    adapter = runner.load_adapter(recipe)
    seen = []
    ctx = GenerationContext(9, 32, 48, 3, 4, 6)

    def op(q, k, v, layout):
        seen.append(ctx.cfg_branch)
        return sdpa(q, k, v)

    site = adapter.attention_sites("full")[0]
    undo = adapter.install_op(site, op, "spy")
    try:
        cond = runner.encode(adapter, recipe)
        guided(adapter, recipe.sampler, ctx)(torch.randn(1, 16, 3, 4, 6), torch.tensor(999.0), cond)
    finally:
        undo()
        adapter.close()
    assert seen == ["cond", "uncond"]
