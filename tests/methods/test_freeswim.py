"""FreeSwim: the inward window (geometry and kernels against the notes' values and a float64 reference), the dual
path on a tiny Wan (full branch = scaled vanilla, override only touches the window branch), cache mode, stage
scoping, resume, recipes and sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from longvid import runner
from longvid.core.context import GenerationContext
from longvid.core.freeswim import dual_forward
from longvid.core.swin_attention import covers_canvas, swin_attention, swin_reference
from longvid.core.swin_geometry import (attention_scale, axis_bounds, block_density, element_density,
                                        keys_per_query, tile_order, window_half, window_member)
from longvid.errors import RecipeError
from longvid.methods.base import applied
from longvid.methods.freeswim import FreeSwim, FreeSwimConfig
from longvid.recipe.resolve import resolve
from longvid.recipe.stages import plan_stages
from tests.engine.test_checkpoint import _interrupt_then_resume, _recipe
from tests.helpers import wan_recipe

# ----------------------------------------------------------------------------------------------- geometry


def test_window_bounds_match_the_notes_spot_checks_at_1088x1920():
    half = window_half((30, 52))  # a 480x832 base on Wan: 16 px per token
    assert half == (15, 26) and window_half((45, 80)) == (22, 40)
    lo_h, hi_h = axis_bounds(68, half[0])
    lo_w, hi_w = axis_bounds(120, half[1])
    for (r, c), rows, cols in [((0, 0), (0, 30), (0, 52)), ((34, 60), (19, 49), (34, 86)),
                               ((67, 119), (37, 67), (67, 119))]:
        assert (int(lo_h[r]), int(hi_h[r]) - 1) == rows and (int(lo_w[c]), int(hi_w[c]) - 1) == cols


@pytest.mark.parametrize("grid, half, keys", [((2, 12, 20), (3, 5), 154), ((3, 9, 16), (4, 7), 405),
                                              ((1, 68, 120), (15, 26), 1643), ((2, 34, 60), (15, 26), 3286)])
def test_every_query_sees_the_same_number_of_keys(grid, half, keys):
    assert keys_per_query(grid, half).unique().tolist() == [keys]
    # the predicate agrees with the per-axis bounds on every pair of a frame (the clamp formula of notes §2.2)
    f, h, w = grid
    tok = torch.arange(h * w)
    member = window_member(tok[:, None], tok[None, :], grid, half)  # (HW, HW)
    assert member.sum(1).unique().tolist() == [keys // f]


def test_truncated_windows_shrink_at_the_border():
    k = keys_per_query((1, 9, 16), (4, 7), inward=False)
    assert k[4, 7] == 9 * 15 and k[0, 0] == 5 * 8  # interior: the full window; corner: a quarter of it


def test_densities_match_the_notes_and_tile_order_keeps_fewer_blocks():
    grid, half = (21, 68, 120), (15, 26)
    assert round(element_density(grid, half), 3) == 0.201
    assert round(element_density((21, 45, 80), half), 3) == 0.456
    assert round(block_density(grid, half), 3) == 0.481  # notes §2.6: raster order, 128-token blocks
    small = (3, 12, 20)
    assert block_density(small, (3, 5), block=16, order=tile_order(small, (4, 2, 2))) < block_density(
        small, (3, 5), block=16)


@pytest.mark.parametrize("order", ["raster", "tile"])
def test_block_density_equals_a_brute_force_count(order):
    grid, half, block = (3, 7, 10), (2, 3), 16
    seq = 3 * 7 * 10
    perm = tile_order(grid, (2, 2, 4)) if order == "tile" else torch.arange(seq)
    assert sorted(perm.tolist()) == list(range(seq))  # a permutation
    member = window_member(perm[:, None], perm[None, :], grid, half)  # (S, S) in the permuted order
    n = math.ceil(seq / block)
    padded = F.pad(member, (0, n * block - seq, 0, n * block - seq))
    kept = padded.view(n, block, n, block).any(3).any(1).sum().item()
    assert block_density(grid, half, block=block, order=None if order == "raster" else perm) == kept / n**2


def test_attention_scale_rules():
    assert math.log(3120) / math.log(1560) == pytest.approx(1.094274, abs=1e-6)
    assert attention_scale(128, "official", 1, 1) * math.sqrt(128) == pytest.approx(1.046076, abs=1e-6)
    assert attention_scale(128, "default", 1, 1) == 128**-0.5
    tokens = attention_scale(128, "tokens", 1560, 68 * 120) * math.sqrt(128)
    assert tokens == pytest.approx(math.sqrt(math.log(8160) / math.log(1560)))


# ----------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("grid, half, inward, tile", [((2, 12, 20), (3, 5), True, (2, 3)),
                                                      ((3, 9, 16), (4, 7), True, None),
                                                      ((2, 7, 9), (2, 3), False, (3, 2)),
                                                      ((1, 6, 11), (1, 4), True, (6, 11))])
@pytest.mark.parametrize("backend, order", [("tiled", "raster"), ("flex", "raster"), ("flex", "tile")])
def test_window_kernels_equal_the_float64_reference(grid, half, inward, tile, backend, order):
    torch.manual_seed(0)
    seq = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(2, 3, seq, 8) for _ in range(3))
    ref = swin_reference(q, k, v, grid, half, 0.4, inward)
    out = swin_attention(q, k, v, grid, half, 0.4, inward, backend=backend, tile=tile, order=order)
    assert (out.double() - ref).abs().max() < 2e-6
    # and it is not full attention
    assert (F.scaled_dot_product_attention(q, k, v, scale=0.4).double() - ref).abs().max() > 1e-2


def test_a_window_at_least_the_canvas_is_full_attention():
    grid = (2, 5, 6)
    assert covers_canvas(grid, (2, 3)) and not covers_canvas(grid, (1, 3)) and not covers_canvas(grid, (2, 3), False)
    q, k, v = (torch.randn(1, 2, 60, 8) for _ in range(3))
    assert torch.equal(swin_attention(q, k, v, grid, (2, 3), 0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3))


# ------------------------------------------------------------------------------------- the dual path on Wan


@pytest.fixture(scope="module")
def wan():
    adapter = runner.load_adapter(resolve(wan_recipe("tiny:wan")))
    yield adapter
    adapter.close()


def _inputs(adapter, frames=2, h=4, w=8):
    torch.manual_seed(1)
    model = adapter.denoisers[0]
    x = torch.randn(1, 16, frames, h * 2, w * 2)  # latents: 2x2 patches -> an (F, h, w) token grid
    text = torch.randn(1, 7, model.config.text_dim)
    return {"hidden_states": x, "timestep": torch.tensor([700.0]), "encoder_hidden_states": text}


def _ctx(height=64, width=128, first=(32, 64), branch="cond"):
    ctx = GenerationContext(num_frames=5, height=height, width=width, latent_frames=2, latent_height=height // 8,
                            latent_width=width // 8, total_steps=10, step=3, first_size=first)
    ctx.cfg_branch = branch
    return ctx


class _ScaledSDPA:
    def __init__(self, scale):
        self.scale = scale

    def __call__(self, q, k, v, layout):
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)


def _scaled_vanilla(adapter, inputs, scale):
    """The model with plain full attention at ``scale`` (through the same op processor)."""
    undo = [adapter.install_op(site, _ScaledSDPA(scale), "reference") for site in adapter.attention_sites("full")]
    try:
        return adapter.denoisers[0](**inputs, return_dict=False)[0]
    finally:
        for u in undo:
            u()


def _dual(adapter, ctx, **settings):
    method = FreeSwim(FreeSwimConfig(mode="nocache", **settings))
    with applied([method], adapter, ctx):
        return dual_forward(adapter.denoisers[0], method.state, **_inputs(adapter))


def test_the_full_branch_is_vanilla_with_the_scale(wan):
    window, full = _dual(wan, _ctx())  # base 32x64 of a 64x128 stage: a 1x3 window on 4x8 tokens
    head_dim = wan.attention_sites("full")[0].module.inner_dim // wan.attention_sites("full")[0].module.heads
    reference = _scaled_vanilla(wan, _inputs(wan), attention_scale(head_dim, "official", 1, 1))
    assert (full - reference).abs().max() < 1e-5
    assert (window - reference).abs().max() > 1e-3  # the window branch is something else


def test_a_window_covering_the_canvas_makes_both_branches_scaled_vanilla(wan):
    window, full = _dual(wan, _ctx(first=(64, 128)))  # base = the stage size
    head_dim = wan.attention_sites("full")[0].module.inner_dim // wan.attention_sites("full")[0].module.heads
    reference = _scaled_vanilla(wan, _inputs(wan), attention_scale(head_dim, "official", 1, 1))
    assert (window - reference).abs().max() < 1e-5 and (full - reference).abs().max() < 1e-5
    vanilla = wan.denoisers[0](**_inputs(wan), return_dict=False)[0]
    assert (reference - vanilla).abs().max() > 1e-4  # the 1.046 scale does change the output


def test_the_override_changes_only_the_window_branch(wan):
    window, full = _dual(wan, _ctx())
    window_own, full_own = _dual(wan, _ctx(), override=False)
    assert (full - full_own).abs().max() < 1e-6
    assert (window - window_own).abs().max() > 1e-4


def test_identity_settings_apply_nothing_and_remove_restores(wan):
    processors = {s.name: s.module.processor for s in wan.attention_sites()}
    method = FreeSwim(FreeSwimConfig(scale="default"))
    with applied([method], wan, _ctx(first=(64, 128))):
        assert {s.name: s.module.processor for s in wan.attention_sites()} == processors
    with applied([FreeSwim(FreeSwimConfig())], wan, _ctx()):
        assert all(s.module.processor is not processors[s.name] for s in wan.attention_sites())
    assert {s.name: s.module.processor for s in wan.attention_sites()} == processors


# ------------------------------------------------------------------------------------------ whole stages


def _two_stage(steps=6, strength=0.7, guidance=5.0, **freeswim):
    m = wan_recipe("tiny:wan", num_frames=9, height=64, width=128)
    m["sampler"].update(steps=steps, guidance_scale=guidance)
    m["stages"] = {"base": {"height": 32, "width": 64}, "refine": {"strength": strength, "sampler": {"flow_shift": 9}}}
    m["methods"] = {"freeswim": {"stages": ["refine"], **freeswim}}
    return m


def _batches(adapter, mapping):
    """The batch size of every transformer call of a generation, by stage step and guidance branch."""
    seen = []
    block = adapter.denoisers[0].blocks[0]  # inside the model: the batch after FreeSwim's doubling
    handle = block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    try:
        latents = runner.generate(resolve(mapping), adapter=adapter, write=False).latents
    finally:
        handle.remove()
    return latents, seen


def test_cache_with_one_step_per_guide_equals_nocache(wan):
    # without guidance: nocache's uncond pass (dual too) is what cache mode deliberately drops
    nocache = runner.generate(resolve(_two_stage(guidance=1.0, mode="nocache")), adapter=wan, write=False).latents
    cache1 = runner.generate(resolve(_two_stage(guidance=1.0, mode="cache", cache_steps=1)), adapter=wan,
                             write=False).latents
    cache2 = runner.generate(resolve(_two_stage(guidance=1.0, mode="cache", cache_steps=2)), adapter=wan,
                             write=False).latents
    assert torch.equal(cache1, nocache)
    assert (cache2 - nocache).abs().max() > 1e-5  # reuse steps take a cached cross-attention


def test_cache_mode_runs_batch_2_only_on_guide_steps_of_the_cond_pass(wan):
    # 6 steps, strength 0.7: the refine stage runs steps 2..5 (4 steps); the base stage runs 6 (vanilla, batch 1)
    base = [1] * 12  # 6 steps x (cond, uncond)
    _, nocache = _batches(wan, _two_stage(mode="nocache"))
    assert nocache == base + [2, 2] * 4
    _, cache = _batches(wan, _two_stage(mode="cache", cache_steps=2))
    assert cache == base + [2, 1, 1, 1, 2, 1, 1, 1]  # (cond, uncond) per step: guide, reuse, guide, reuse
    _, every3 = _batches(wan, _two_stage(mode="cache", cache_steps=3))
    assert every3 == base + [2, 1, 1, 1, 1, 1, 2, 1]


def test_the_method_is_scoped_to_the_refine_stage_and_its_schedule_starts_at_sigma_0_9546():
    plans = plan_stages(resolve("freeswim-1080p"))
    assert [(p.name, list(p.methods)) for p in plans] == [("base", []), ("refine", ["freeswim"])]
    refine = plans[1]
    assert (refine.height, refine.width, refine.start_step, refine.sampler.steps) == (1088, 1920, 15, 50)
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=9.0)
    scheduler.set_timesteps(50)
    assert round(float(scheduler.sigmas[15]), 4) == 0.9546 and int(scheduler.timesteps[15]) == 954


def test_the_cache_survives_a_checkpoint_and_the_resume_is_bit_identical(tmp_path):
    # refine steps 2..7 of 8 with a guide every 3rd: stopping after step 3 resumes on a reuse step (step 4)
    def mapping():
        return _two_stage(steps=8, strength=0.75, mode="cache", cache_steps=3)

    uninterrupted = runner.generate(_recipe(mapping(), tmp_path / "a"))
    err, resumed = _interrupt_then_resume(_recipe(mapping(), tmp_path / "b"), "step:refine", 2)
    assert "stage refine, step 4/8" in str(err)
    assert torch.equal(resumed.latents, uninterrupted.latents)


def test_wan22_two_experts_each_get_a_cache():
    m = _two_stage(steps=6, mode="cache", cache_steps=4)
    m["model"]["path"] = "tiny:wan2.2-a14b"
    adapter = runner.load_adapter(resolve(m))
    try:
        calls = {name: [] for name in adapter.named_denoisers}
        handles = [model.blocks[0].register_forward_pre_hook(
            lambda mod, args, name=name: calls[name].append(args[0].shape[0]))
            for name, model in adapter.named_denoisers.items()]
        out = runner.generate(resolve(m), adapter=adapter, write=False).latents
        for h in handles:
            h.remove()
    finally:
        adapter.close()
    assert torch.isfinite(out).all()
    refine = {name: [b for b in seen if b == 2] for name, seen in calls.items()}
    # both experts ran dual at least once in the refine stage: the second expert guides on its first step
    assert all(refine[name] for name in calls), calls


def test_sizes_1080_is_refused_with_1088_and_the_crop():
    with pytest.raises(RecipeError) as err:
        resolve("freeswim-1080p", ["video.height=1080"])
    assert "got 1080 (nearest: 1072 or 1088; generate 1088 and set output.crop=[1080,1920]" in str(err.value)
    with pytest.raises(RecipeError, match="output.crop"):
        resolve("freeswim-1080p", ["output.crop=[1100,1920]"])
    with pytest.raises(RecipeError, match="methods.freeswim.cache_steps"):
        resolve("freeswim-1080p", ["methods.freeswim.cache_steps=0"])


def test_a_cropped_file_has_the_crop_size(tmp_path):
    import imageio_ffmpeg

    m = _two_stage(steps=2)
    m["output"] = {"dir": str(tmp_path), "name": "clip", "crop": [56, 120]}
    runner.generate(resolve(m))
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "clip.mp4"))
    meta = next(reader)
    assert meta["size"] == (120, 56)  # (width, height)
    reader.close()


def test_a_cache_that_cannot_fit_is_refused_with_the_fix(wan, monkeypatch):
    from longvid.core import freeswim as core
    from longvid.errors import MethodError

    monkeypatch.setattr(core, "free_bytes", lambda device: 1000)  # a machine with 1000 bytes free
    before = {s.name: s.module.processor for s in wan.attention_sites()}
    method = FreeSwim(FreeSwimConfig(mode="cache"))
    with pytest.raises(MethodError, match="mode=nocache or cache_device=cpu"):
        with applied([method], wan, _ctx()):
            pass
    assert {s.name: s.module.processor for s in wan.attention_sites()} == before  # nothing left installed
    with applied([FreeSwim(FreeSwimConfig(mode="nocache"))], wan, _ctx()):  # nocache keeps nothing: it runs
        pass
    grid = wan.token_grid(5, 64, 128)  # (2, 4, 8) tokens; 2 cross sites of width 72 in float32
    assert core.cache_bytes(wan, grid) == 2 * 64 * 72 * 4
