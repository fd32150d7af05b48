"""RoPE seam and the RoPE length-extrapolation family: RIFLEx, NTK, PI, YaRN.

Reference values are the notes' (ultravico-riflex.md §3, freeloc-freeswim-riflex.md §5 case 9), computed from
the official formulas on the real Wan 2.1 rotary module (head dim 128: temporal band 44 dims).
"""

import math

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from longvid import runner
from longvid.core.context import GenerationContext
from longvid.core.rope import (AxisEdit, apply_rope_edits, axis_table, check_stock_tables, intrinsic_frequency,
                               inverse_frequencies, ntk, position_interpolation, riflex, yarn)
from longvid.errors import RecipeError
from longvid.methods.base import applied
from longvid.recipe.resolve import resolve
from tests.helpers import wan_recipe


@pytest.fixture
def wan_rope():
    return WanRotaryPosEmbed(128, (1, 2, 2), 1024)  # Wan 2.1 1.3B/14B: head dim 128


def _tables(rope, frames, height=4, width=4):
    return rope(torch.zeros(1, 16, frames, height, width))  # (cos, sin), each (1, S, 1, 128)


def test_identity_edit_rebuilds_the_stock_tables_bit_for_bit(wan_rope):
    assert check_stock_tables(wan_rope)
    ref = _tables(wan_rope, 21, 60, 104)
    undo = apply_rope_edits(wan_rope, {"t": AxisEdit(), "h": AxisEdit()}, "longvid.test.rope")
    ours = _tables(wan_rope, 21, 60, 104)
    undo()
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))
    assert all(torch.equal(a, b) for a, b in zip(ref, _tables(wan_rope, 21, 60, 104)))  # removed: stock again


def test_riflex_reference_values(wan_rope):
    """k = 6, L = 84: θ_6 0.123285 -> 0.067320 (period 93.33); only columns 10 and 11 change; cos[83,10] and
    sin[83,11] as the notes' reference."""
    theta = float(inverse_frequencies(44)[5])
    assert round(theta, 6) == 0.123285
    undo = apply_rope_edits(wan_rope, {"t": riflex(6, 84)}, "longvid.riflex.rope")
    cos, sin = _tables(wan_rope, 84, 2, 2)
    undo()
    ref_cos, ref_sin = _tables(wan_rope, 84, 2, 2)
    changed = ((cos != ref_cos) | (sin != ref_sin)).reshape(-1, 128).any(0).nonzero().flatten().tolist()
    assert changed == [10, 11]
    row = 83  # latent frame 83 (one token per frame at 2x2 latents with the 2x2 patch)
    assert cos[0, row, 0, 10].item() == pytest.approx(0.76764476, abs=1e-7)
    assert sin[0, row, 0, 11].item() == pytest.approx(-0.64087564, abs=1e-7)
    assert 0.9 * 2 * math.pi / 84 == pytest.approx(0.067320, abs=1e-6)


def test_identify_k_presets():
    assert intrinsic_frequency(16, 48, base=256) == (4, 50)  # HunyuanVideo
    assert intrinsic_frequency(16, 20, base=1e4) == (2, 20)  # CogVideoX-5B
    assert intrinsic_frequency(44, 51) == (6, 51)  # Wan (community k = 6)
    periods = [round(2 * math.pi / float(t), 2) for t in inverse_frequencies(44)][:8]
    assert periods == [6.28, 9.55, 14.51, 22.06, 33.53, 50.96, 77.46, 117.74]


def test_ntk_pi_yarn_formulas():
    inv = inverse_frequencies(44)
    s, d = 4.0, 44
    base_ntk = 1e4 * s ** (d / (d - 2))
    assert torch.allclose(ntk(s, d).frequencies(inv), inverse_frequencies(44, base_ntk), rtol=1e-12, atol=0)
    pos = torch.arange(10, dtype=torch.float64)
    assert torch.equal(position_interpolation(2.0).positions(pos), pos / 2.0)
    edited = yarn(s, 21).frequencies(inv)
    turns = 21 * inv / (2 * math.pi)
    assert torch.equal(edited[turns >= 1.0], inv[turns >= 1.0])  # full periods seen: extrapolate
    assert torch.allclose(edited[turns <= 0.6], inv[turns <= 0.6] / s, rtol=1e-15)  # interpolate
    mid = (turns > 0.6) & (turns < 1.0)
    assert mid.any() and ((edited[mid] < inv[mid]) & (edited[mid] > inv[mid] / s)).all()


def test_tables_are_float64_angles_cast_to_float32():
    cos, sin = axis_table(44, 100, edit=riflex(6, 84))
    angles = torch.outer(torch.arange(100, dtype=torch.float64), riflex(6, 84).frequencies(inverse_frequencies(44)))
    assert cos.dtype == torch.float32 and torch.equal(cos[:, ::2], angles.cos().float())


@pytest.mark.parametrize("frames, active", [(161, False), (321, True)])  # 41 / 81 latent frames vs N_k = 51
def test_riflex_gate_on_wan_is_off_at_2x_and_on_at_4x(frames, active):
    recipe = resolve(wan_recipe("tiny:wan", num_frames=frames), ["methods.riflex={}"])
    adapter = runner.load_adapter(recipe)
    spec = adapter.spec
    ctx = GenerationContext(frames, 32, 48, spec.latent_frames(frames), 4, 6)
    try:
        rope = adapter.pipe.transformer.rope
        assert rope.t_dim == 12  # the tiny model's band: its k = 6 period is 13533 frames, so gate off here
        recipe.methods["riflex"].gate = True
        with applied(runner.build_methods(recipe), adapter, ctx):
            hooked = "longvid.riflex.rope" in getattr(getattr(rope, "_diffusers_hook", None), "hooks", {})
        assert hooked is False
        recipe.methods["riflex"].gate = False
        with applied(runner.build_methods(recipe), adapter, ctx):
            hooked = "longvid.riflex.rope" in rope._diffusers_hook.hooks
        assert hooked
    finally:
        adapter.close()
    # on the real band the official gate decides by N_k = 51
    from longvid.methods.rope_extrapolation import Riflex, RiflexConfig

    edit = Riflex(RiflexConfig()).edit(spec.latent_frames(frames), 21, spec, 44)
    assert (edit is not None) == active


def test_every_expert_gets_the_edit():
    recipe = resolve(wan_recipe("tiny:wan2.2-a14b", num_frames=161), ["methods.ntk={}"])
    adapter = runner.load_adapter(recipe)
    ctx = GenerationContext(161, 32, 48, 41, 4, 6)  # 41 latent frames: s = 41/21
    try:
        with applied(runner.build_methods(recipe), adapter, ctx):
            hooked = {name: "longvid.ntk.rope" in m._diffusers_hook.hooks for name, m in adapter.rope_modules.items()}
        assert hooked == {"transformer": True, "transformer_2": True}
        assert all(not m._diffusers_hook.hooks for m in adapter.rope_modules.values())
    finally:
        adapter.close()


@pytest.mark.parametrize("method", ["riflex", "ntk", "pi", "yarn"])
def test_each_changes_a_long_wan_video_and_not_a_native_one(method):
    from longvid import registry

    spec = registry.model_spec("wan")
    settings = registry.method_class(method).active_settings(spec)
    adapter = runner.load_adapter(resolve(wan_recipe("tiny:wan")))
    try:
        def run(frames, methods):
            return runner.generate(resolve(dict(wan_recipe("tiny:wan", num_frames=frames), methods=methods),
                                           ["sampler.steps=2"]), adapter=adapter, write=False).latents
        assert torch.equal(run(81, {method: {}}), run(81, {}))  # scale 1 (and the gate): vanilla
        assert (run(161, {method: settings}) - run(161, {})).abs().max() > 1e-4
    finally:
        adapter.close()


@pytest.mark.parametrize("methods, key, text", [
    ({"riflex": {}, "ntk": {}}, "methods.riflex", "patches the same RoPE as methods.ntk"),
    ({"riflex": {}, "freenoise": {}}, "methods.riflex", "FreeNoise context windows keep positions window-local"),
    ({"yarn": {"low": 1.0, "high": 0.5}}, "methods.yarn", "low < high"),
    ({"riflex": {"k": 0}}, "methods.riflex", "1-based"),
    ({"pi": {"scale": -2}}, "methods.pi", "positive"),
])
def test_validation(methods, key, text):
    with pytest.raises(RecipeError) as info:
        resolve(dict(wan_recipe("tiny:wan", num_frames=161), methods=methods))
    assert any(p.key == key and text in p.message for p in info.value.problems), info.value.problems
    ok = resolve(dict(wan_recipe("tiny:wan", num_frames=161), methods={"riflex": {}, "freenoise": {"fusion": "none"}}))
    assert set(ok.methods) == {"riflex", "freenoise"}
