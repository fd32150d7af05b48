"""Attention ops, second version: head groups on Wan, q/k before RoPE with a rotary helper, the vanilla path
through diffusers' dispatch, one attention method per site, sites per expert."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

from longvid import runner
from longvid.core.context import AttentionSite, TokenLayout
from longvid.core.processors import StepWindow, sdpa
from longvid.errors import MethodError, RecipeError
from longvid.models import wan as wan_module
from longvid.models.wan import WanOpProcessor, WanRotary
from longvid.recipe.resolve import resolve
from tests.helpers import animatediff_recipe, wan_recipe

HEADS, HEAD_DIM, GRID = 4, 12, (3, 2, 4)  # (F, H, W) tokens


def _wan_attention():
    torch.manual_seed(0)
    attn = WanAttention(dim=HEADS * HEAD_DIM, heads=HEADS, dim_head=HEAD_DIM).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    rope = WanRotaryPosEmbed(HEAD_DIM, (1, 1, 1), 64)
    x = torch.randn(2, GRID[0] * GRID[1] * GRID[2], HEADS * HEAD_DIM)  # (B, S, C)
    rotary = rope(torch.zeros(2, 1, *GRID))  # (cos, sin), each (1, S, 1, D)
    site = AttentionSite("blocks.0.attn1", attn, "full", denoiser="transformer",
                         layout=TokenLayout("full", 2, *GRID))
    return attn, rope, site, x, rotary


def _vanilla(attn, x, rotary):
    attn.set_processor(WanAttnProcessor())
    with torch.no_grad():
        return attn(x, None, None, rotary)


@pytest.mark.parametrize("group_bytes", [256 << 20, 1])  # all heads at once; one head per group
def test_wan_op_processor_with_sdpa_equals_vanilla(group_bytes):
    attn, rope, site, x, rotary = _wan_attention()
    ref = _vanilla(attn, x, rotary)
    calls = []

    def op(q, k, v, layout):
        calls.append(q.shape)
        return sdpa(q, k, v)

    attn.set_processor(WanOpProcessor(site, op, rope, group_bytes=group_bytes))
    with torch.no_grad():
        ours = attn(x, None, None, rotary)
    assert (ours - ref).abs().max() <= 1e-6 and ref.abs().max() > 0.1
    heads_per_call = HEADS if group_bytes > 1 else 1
    assert calls == [torch.Size([2, heads_per_call, 24, HEAD_DIM])] * (HEADS // heads_per_call)


def test_pre_rope_op_gets_unrotated_qk_and_a_rotary_helper():
    attn, rope, site, x, rotary = _wan_attention()
    ref = _vanilla(attn, x, rotary)
    seen = {}

    class PreRope:
        pre_rope = True

        def __call__(self, q, k, v, layout, rotary):
            seen["grid"] = rotary.grid
            f, h, w = rotary.grid
            pos = torch.arange(f * h * w)
            cos, sin = rotary.tables(pos // (h * w), pos // w % h, pos % w)  # the grid's own positions
            seen["tables_equal"] = torch.equal(cos, rotary.cos) and torch.equal(sin, rotary.sin)
            seen["unrotated"] = q
            return sdpa(rotary.apply(q), rotary.apply(k), v)

    attn.set_processor(WanOpProcessor(site, PreRope(), rope, group_bytes=1))
    with torch.no_grad():
        ours = attn(x, None, None, rotary)
    assert (ours - ref).abs().max() <= 1e-6
    assert seen["grid"] == GRID and seen["tables_equal"]
    q_proj = attn.norm_q(attn.to_q(x)).unflatten(2, (HEADS, -1))[:, :, -1:].transpose(1, 2)  # last head, no RoPE
    assert torch.allclose(seen["unrotated"], q_proj, atol=1e-6)


def test_a_remapped_position_changes_only_that_axis():
    _, rope, _, _, rotary = _wan_attention()
    helper = WanRotary(rotary, rope, GRID)
    pos = torch.arange(24)
    f, h, w = pos // 8, pos // 4 % 2, pos % 4
    cos, _ = helper.tables(torch.zeros_like(f), h, w)  # every token at temporal position 0
    t_dim = rope.t_dim
    assert torch.equal(cos[..., t_dim:], helper.cos[..., t_dim:])
    assert torch.equal(cos[0, 0, :, :t_dim], helper.cos[0, 0, :1, :t_dim].expand(24, -1))


def test_inactive_op_runs_vanilla_attention_through_dispatch(monkeypatch):
    attn, rope, site, x, rotary = _wan_attention()
    ref = _vanilla(attn, x, rotary)
    dispatched, ran = [], []
    real = wan_module.dispatch_attention_fn
    monkeypatch.setattr(wan_module, "dispatch_attention_fn",
                        lambda *a, **kw: dispatched.append(kw.get("backend")) or real(*a, **kw))

    class Gated:
        def __init__(self, on):
            self.on = on

        def active(self):
            return self.on

        def __call__(self, q, k, v, layout):
            ran.append(1)
            return sdpa(q, k, v) * 0  # visibly wrong: the test would see it if it ran while inactive

    processor = WanOpProcessor(site, Gated(False), rope)
    processor._attention_backend = "native"
    attn.set_processor(processor)
    with torch.no_grad():
        ours = attn(x, None, None, rotary)
    assert torch.equal(ours, ref) and dispatched == ["native"] and ran == []
    processor.op = Gated(True)
    with torch.no_grad():
        attn(x, None, None, rotary)
    assert ran and dispatched == ["native"]


def test_step_window_is_half_open_on_the_schedule():
    from longvid.core.context import GenerationContext

    ctx = GenerationContext(9, 32, 48, 3, 4, 6, total_steps=10)
    gate = StepWindow(sdpa, ctx, 0.2, 0.5)
    active = [s for s in range(10) if (setattr(ctx, "step", s) or gate.active())]
    assert active == [2, 3, 4]


@pytest.fixture(scope="module")
def wan22():
    adapter = runner.load_adapter(resolve(wan_recipe("tiny:wan2.2-a14b")))
    yield adapter
    adapter.close()


def test_wan22_sites_per_expert_with_their_own_layer_indices_and_rope(wan22):
    sites = wan22.attention_sites("full")
    assert [(s.denoiser, s.layer) for s in sites] == [("transformer", 0), ("transformer", 1),
                                                      ("transformer_2", 0), ("transformer_2", 1)]
    assert [(s.denoiser, s.layer) for s in wan22.attention_sites("cross")] == [(s.denoiser, s.layer) for s in sites]
    assert all(s.module is s.block.attn2 for s in wan22.attention_sites("cross"))
    assert wan22.rope_modules == {"transformer": wan22.pipe.transformer.rope,
                                  "transformer_2": wan22.pipe.transformer_2.rope}


def test_freelong_layers_pick_the_same_block_in_both_experts(wan22):
    from longvid.core.context import GenerationContext
    from longvid.methods.base import applied

    recipe = resolve(wan_recipe("tiny:wan2.2-a14b", num_frames=33), ["methods.freelong.layers=[1]"])
    ctx = GenerationContext(33, 32, 48, 9, 4, 6, total_steps=3)
    with applied(runner.build_methods(recipe), wan22, ctx):
        patched = {(s.denoiser, s.layer) for s in wan22.attention_sites("full")
                   if isinstance(s.module.processor, WanOpProcessor)}
    assert patched == {("transformer", 1), ("transformer_2", 1)}
    assert not any(isinstance(s.module.processor, WanOpProcessor) for s in wan22.attention_sites("full"))


def test_a_second_method_on_a_site_is_refused_at_install(wan22):
    site = wan22.attention_sites("full")[0]
    undo = wan22.install_op(site, sdpa, "freelong")
    try:
        with pytest.raises(MethodError, match="methods.other: attention site transformer.blocks.0.attn1 is already "
                                              "patched by methods.freelong"):
            wan22.install_op(site, sdpa, "other")
    finally:
        undo()
    undo = wan22.install_op(site, sdpa, "other")  # released: another method may patch it now
    undo()
    assert type(site.module.processor).__name__ == "WanAttnProcessor"


def test_processor_keeps_the_attention_backend_of_the_one_it_replaces(wan22):
    site = wan22.attention_sites("full")[1]
    site.module.processor._attention_backend = "native"
    try:
        undo = wan22.install_op(site, sdpa, "m")
        assert site.module.processor._attention_backend == "native"
        undo()
    finally:
        site.module.processor._attention_backend = None


def test_resolve_reports_two_methods_on_the_same_sites():
    mapping = animatediff_recipe("tiny:animatediff", num_frames=40)
    mapping["methods"] = {"freenoise": {"fusion": "layer"}, "freelong": {}}
    with pytest.raises(RecipeError) as info:
        resolve(mapping)
    assert any(p.key == "methods.freenoise" and "patches the same temporal attention sites as methods.freelong"
               in p.message for p in info.value.problems)
    # scoped to different stages, they do not meet
    mapping["video"].update(height=32, width=32)
    mapping["stages"] = {"base": {"height": 16, "width": 16}, "refine": {"strength": 0.5}}
    mapping["methods"] = {"freenoise": {"fusion": "layer", "stages": ["base"]}, "freelong": {"stages": ["refine"]}}
    resolved = resolve(mapping)
    assert set(resolved.methods) == {"freenoise", "freelong"}


def test_a_wrapped_projection_is_called_not_bypassed():
    """A LoRA-like wrapper (or an offloaded layer) on to_v / to_out must run as a module: the head-group fast
    path reads raw weights only from a bare nn.Linear."""
    attn, rope, site, x, rotary = _wan_attention()

    class Doubled(torch.nn.Module):  # stands for a LoRA layer: another type around the same Linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            return self.inner(h) * 2

    attn.to_v = Doubled(attn.to_v)
    attn.to_out[0] = Doubled(attn.to_out[0])
    ref = _vanilla(attn, x, rotary)
    attn.set_processor(WanOpProcessor(site, sdpa, rope, group_bytes=1))
    with torch.no_grad():
        ours = attn(x, None, None, rotary)
    assert (ours - ref).abs().max() <= 1e-5 and ref.abs().max() > 0.1
