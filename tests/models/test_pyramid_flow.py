"""Pyramid Flow foundations against the notes' reference values: the schedule's tables and jumps, the block noise,
the spatial pyramid and the history each stage sees, the token sequence (patch order, positions, mask) and the
miniFLUX DiT (the released key list exactly; the forward equal to diffusers' own on the same tokens)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from longvid.models.pyramid_flow.dit_flux import MINIFLUX_CONFIG, flux_forward
from longvid.models.pyramid_flow.pyramid import half, history, history_plan, pyramid, unit_noise
from longvid.models.pyramid_flow.scheduler import PyramidSchedule, block_noise, euler_step, stage_jump
from longvid.models.pyramid_flow.sequence import attention_mask, frame_index, image_ids, pack, unpack

#: the released checkpoints' key names and shapes (data: name -> shape, from the notes)
KEYS = Path(__file__).resolve().parent / "data" / "pyramid-flow-keys"

# --------------------------------------------------------------------------------------------- schedule


def test_stage_tables_match_the_notes():
    s = PyramidSchedule()
    assert s.ori_start_sigmas == [1.0, 0.667, 0.334] and s.end_sigmas == [0.667, 0.334, 0.0]
    assert [round(x, 5) for x in s.start_sigmas] == [1.0, 0.80024, 0.50075]
    assert all(abs(x - 2 * e / (1 + e)) < 1e-12 for x, e in zip(s.start_sigmas[1:], s.ori_start_sigmas[1:]))
    assert s.stage_timesteps == [(1000.0, 744.0), (744.0, 386.0), (386.0, 1.0)]


def test_set_timesteps_and_local_ratios():
    s = PyramidSchedule()
    t = s.timesteps(10, 0)
    assert t[0] == 1000 and abs(t[-1] - 744.256) < 1e-9 and abs(t[1] - 971.584) < 1e-9
    assert abs(s.timesteps(10, 2)[-1] - 1.385) < 1e-9 and s.timesteps(20, 1)[0] == 744
    assert s.timesteps(1, 1).tolist() == [744.0]
    r = s.ratios(20)
    assert r.shape == (21,) and r[0] == 1 and abs(r[-2] - 0.001) < 1e-12 and r[-1] == 0
    assert s.ratios(1).tolist() == [1.0, 0.0]


def test_jump_coefficients_and_the_isotropic_noise_they_make():
    s = PyramidSchedule()
    assert [tuple(round(v, 5) for v in s.jump(k)) for k in (1, 2)] == [(0.59988, 0.69303), (0.74963, 0.43366)]
    for k in (1, 2):  # α²e²·11ᵀ + β²Σ = σ_start²·I: the jumped state has isotropic noise at the stage's start σ
        alpha, beta = s.jump(k)
        e, g = s.ori_start_sigmas[k], s.gamma
        sigma = (1 + g) * torch.eye(4, dtype=torch.float64) - g * torch.ones(4, 4, dtype=torch.float64)
        cov = alpha**2 * e**2 * torch.ones(4, 4, dtype=torch.float64) + beta**2 * sigma
        assert torch.allclose(cov, s.start_sigmas[k] ** 2 * torch.eye(4, dtype=torch.float64), atol=1e-12)
        assert abs(alpha * (1 - e) - (1 - s.start_sigmas[k])) < 1e-12  # and the clean signal's share matches


def test_block_noise_closed_form_statistics():
    g = torch.Generator().manual_seed(0)
    n = block_noise((4000, 2, 8, 8), 1 / 3, g, dtype=torch.float64)
    blocks = n.reshape(4000, 2, 4, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(-1, 4)  # (samples, 4) per block
    assert blocks.sum(1).abs().max() < 1e-12  # singular Σ at γ = 1/3: every block sums to zero
    assert abs(n.var().item() - 1) < 0.02
    cov = blocks.T @ blocks / blocks.shape[0]
    target = (4 / 3) * torch.eye(4, dtype=torch.float64) - (1 / 3) * torch.ones(4, 4, dtype=torch.float64)
    assert (cov - target).abs().max() < 0.03
    other = block_noise((4000, 2, 8, 8), 0.2, torch.Generator().manual_seed(1), dtype=torch.float64)
    b2 = other.reshape(4000, 2, 4, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(-1, 4)
    assert ((b2.T @ b2 / b2.shape[0]) - (1.2 * torch.eye(4, dtype=torch.float64) - 0.2)).abs().max() < 0.03
    same = block_noise((2, 8, 8), 1 / 3, torch.Generator().manual_seed(5))
    assert torch.equal(same, block_noise((2, 8, 8), 1 / 3, torch.Generator().manual_seed(5)))  # seeded, no global RNG
    with pytest.raises(ValueError, match="gamma"):
        block_noise((2, 2), 0.5)


def test_stage_jump_is_nearest_upsampling_plus_scaled_block_noise():
    x = torch.randn(1, 2, 3, 4, 4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = stage_jump(x, 0.6, 0.7, 1 / 3, g1)
    up = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.allclose(out, 0.6 * up + 0.7 * block_noise((1, 2, 3, 8, 8), 1 / 3, g2), atol=1e-6)


def test_euler_step_updates_in_float32_and_keeps_the_model_dtype():
    x = torch.randn(64).bfloat16()
    v = torch.randn(64).bfloat16()
    out = euler_step(x, v, 0.778, 0.667)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (x.float() + (0.667 - 0.778) * v.float()).bfloat16())
    assert not torch.equal(out, x + (0.667 - 0.778) * v)  # a bf16 update would round differently


# --------------------------------------------------------------------------------------------- pyramid


def test_half_is_a_two_by_two_average_and_noise_keeps_unit_variance():
    x = torch.randn(1, 3, 2, 8, 12, dtype=torch.float64)
    pooled = F.avg_pool2d(x.permute(0, 2, 1, 3, 4).reshape(2, 3, 8, 12), 2).reshape(1, 2, 3, 4, 6)
    assert (half(x) - pooled.permute(0, 2, 1, 3, 4)).abs().max() < 1e-12
    noise = unit_noise((2, 16, 3, 64, 64), torch.Generator().manual_seed(0))
    assert noise.shape == (2, 16, 3, 16, 16) and abs(noise.var().item() - 1) < 0.03


def test_history_plans_for_units_1_to_5():
    assert history_plan(1, 2) == [(0, 2)] and history_plan(2, 2) == [(0, 1), (1, 2)]
    assert history_plan(3, 2) == [(0, 0), (1, 1), (2, 2)]
    assert history_plan(5, 2) == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 2)]
    assert history_plan(5, 1) == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 1)]
    assert history_plan(5, 0) == [(f, 0) for f in range(5)]
    assert history_plan(0, 2) == []


def test_history_clips_hold_the_planned_frames_at_their_resolutions():
    latents = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 1, 5, 16, 16).contiguous()  # frame f holds f
    levels = pyramid(latents)
    assert [lv.shape[-1] for lv in levels] == [4, 8, 16]
    clips = history(levels, 5, 2)
    assert [tuple(c.shape[2:]) for c in clips] == [(3, 4, 4), (1, 8, 8), (1, 16, 16)]
    assert [c[0, 0, :, 0, 0].tolist() for c in clips] == [[0.0, 1.0, 2.0], [3.0], [4.0]]


# --------------------------------------------------------------------------------------------- sequence


def test_patches_are_p1_p2_c_and_unpack_inverts_pack():
    clip = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(1, 2, 1, 2, 2)  # C=2, one 2x2 patch
    # (p1 p2 c): (0,0,c0), (0,0,c1), (0,1,c0), ... -> values c*4 + p1*2 + p2
    assert pack(clip)[0, 0].tolist() == [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
    x = torch.randn(2, 16, 3, 8, 12)
    assert pack(x).shape == (2, 3 * 4 * 6, 64) and torch.equal(unpack(pack(x), tuple(x.shape)), x)


def test_positions_interpolate_low_resolution_history():
    clips = [torch.zeros(1, 16, 2, 8, 8), torch.zeros(1, 16, 1, 16, 16), torch.zeros(1, 16, 1, 32, 32)]
    assert frame_index(clips).tolist() == [0] * 16 + [1] * 16 + [2] * 64 + [3] * 256
    ids = image_ids(clips)  # current grid 16x16 tokens; 1/4 res rows at 1.5, 5.5, ...; 1/2 res at 0.5, 2.5, ...
    assert ids[:4, 2].tolist() == [1.5, 5.5, 9.5, 13.5] and ids[32:40, 2].tolist() == [0.5 + 2 * i for i in range(8)]
    assert ids[-1].tolist() == [3.0, 15.0, 15.0] and ids[16, 0] == 1


@pytest.mark.parametrize("case", ["first frame", "u=3 stage 2", "u=3 stage 0"])
def test_block_causal_mask(case):
    text_mask = torch.tensor([[1, 1, 1, 0, 0]])  # two padded text tokens
    if case == "first frame":
        clips = [torch.zeros(1, 16, 1, 4, 4)]
    elif case == "u=3 stage 2":
        clips = [torch.zeros(1, 16, 1, 2, 2), torch.zeros(1, 16, 1, 4, 4), torch.zeros(1, 16, 1, 8, 8),
                 torch.zeros(1, 16, 1, 8, 8)]
    else:
        clips = [torch.zeros(1, 16, 3, 2, 2), torch.zeros(1, 16, 1, 2, 2)]
    mask = attention_mask(text_mask, clips)[0, 0]
    tau = torch.cat([torch.zeros(5, dtype=torch.int64), frame_index(clips)])
    valid = torch.cat([text_mask[0].bool(), torch.ones(len(tau) - 5, dtype=torch.bool)])
    for i in range(len(tau)):  # the rule of notes §2.2, entry by entry
        for j in range(len(tau)):
            assert mask[i, j] == ((valid[i] == valid[j]) and tau[i] >= tau[j])
    assert not mask[3:5, :3].any() and not mask[:3, 3:5].any() and mask[3:5, 3:5].all()  # padding isolated
    assert mask[5:, :3].all()  # vision sees all real text
    frame0 = tau == 0
    assert torch.equal(mask[0], frame0 & valid)  # text sees text and frame 0 only
    if case == "first frame":
        assert mask[5:, 5:].all()  # one frame: full attention


# --------------------------------------------------------------------------------------------- miniFLUX DiT


def _released_keys(name: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape = line.split("\t")
        keys[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    return keys


def test_the_miniflux_config_has_exactly_the_released_keys_and_shapes():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**MINIFLUX_CONFIG)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _released_keys("miniflux-dit-keys.txt")  # strict: no missing, no unexpected, same shapes
    assert sum(math.prod(s) for s in ours.values()) == pytest.approx(1.9721e9, rel=1e-4)


@pytest.fixture(scope="module")
def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**{**MINIFLUX_CONFIG, "num_layers": 2, "num_single_layers": 2,
                                      "num_attention_heads": 2, "joint_attention_dim": 32,
                                      "pooled_projection_dim": 24})
    with torch.no_grad():  # diffusers zero-initialises the adaLN and output layers: perturb everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _flux_inputs():
    torch.manual_seed(1)
    clips = [torch.randn(2, 16, 2, 4, 4), torch.randn(2, 16, 1, 8, 8), torch.randn(2, 16, 1, 16, 16),
             torch.randn(2, 16, 1, 16, 16)]
    return clips, torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]), torch.randn(2, 24)


@torch.no_grad()
def test_flux_forward_equals_diffusers_forward_on_the_same_tokens(tiny_flux):
    clips, text, text_mask, pooled = _flux_inputs()
    t = torch.tensor([700.0, 700.0])
    ours = flux_forward(tiny_flux, clips, text, text_mask, pooled, t, dense_mask=True)  # the official kernel
    tokens = torch.cat([pack(c) for c in clips], 1)
    out = tiny_flux(hidden_states=tokens, encoder_hidden_states=text, pooled_projections=pooled, timestep=t / 1000,
                    img_ids=image_ids(clips), txt_ids=torch.zeros(5, 3),
                    joint_attention_kwargs={"attention_mask": attention_mask(text_mask, clips)}, return_dict=False)[0]
    assert ours.shape == (2, 16, 1, 16, 16)
    assert torch.equal(ours, unpack(out[:, -64:], (2, 16, 1, 16, 16)))


@torch.no_grad()
def test_flux_forward_padded_text_is_inert_and_history_matters(tiny_flux):
    clips, text, text_mask, pooled = _flux_inputs()
    t = torch.tensor([500.0, 500.0])
    base = flux_forward(tiny_flux, clips, text, text_mask, pooled, t)
    padded = text.clone()
    padded[1, 2:] += 5.0  # the padded tokens of the second prompt
    assert torch.equal(flux_forward(tiny_flux, clips, padded, text_mask, pooled, t), base)
    older = [c.clone() for c in clips]
    older[0] += 1.0  # the oldest (1/4 resolution) history frames
    assert (flux_forward(tiny_flux, older, text, text_mask, pooled, t) - base).abs().max() > 1e-3


@pytest.mark.parametrize("shapes, padded", [
    ([(1, 4), (1, 8), (1, 16), (1, 16)], True),  # unit 3, stage 2: [0 @1/4, 1 @1/2, 2 @full] + current
    ([(3, 4), (1, 4)], False),  # stage 0 of unit 3: three history frames in one clip, no padded text
    ([(1, 8)], True),  # the first unit: no history (one frame: text + frame 0 only)
])
def test_block_causal_attention_is_the_dense_masked_attention(shapes, padded):
    """Only the blocks the mask keeps are attended, and the result is the dense boolean-mask SDPA's (the official
    kernel) for every query, padded text rows included; the layout's dense mask is sequence.attention_mask."""
    from longvid.models.pyramid_flow.attention import block_causal, block_causal_attention

    g = torch.Generator().manual_seed(0)
    clips = [torch.zeros(2, 16, t, s, s) for t, s in shapes]
    text_mask = torch.ones(2, 6, dtype=torch.long)
    if padded:
        text_mask[0, 4:] = 0
    layout = block_causal(text_mask, clips)
    dense = attention_mask(text_mask, clips)
    assert torch.equal(layout.dense(), dense)
    length = dense.shape[-1]
    q, k, v = (torch.randn(2, 3, length, 8, generator=g) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    got = block_causal_attention(q, k, v, layout)
    assert (got - expected).abs().max() <= 1e-6
    if len(layout.ends) > 1:  # a query of the last frame sees keys the first frame's queries do not
        assert (got - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-2


@torch.no_grad()
def test_flux_and_sd3_block_kernels_equal_their_dense_reference(tiny_flux, tiny_sd3):
    from longvid.models.pyramid_flow.dit_sd3 import sd3_forward

    clips, text, text_mask, pooled = _flux_inputs()
    t = torch.tensor([700.0, 700.0])
    dense = flux_forward(tiny_flux, clips, text, text_mask, pooled, t, dense_mask=True)
    blocks = flux_forward(tiny_flux, clips, text, text_mask, pooled, t)
    assert (blocks - dense).abs().max() <= 1e-5 * dense.abs().max() and dense.abs().max() > 0.1
    pooled_sd3 = torch.randn(2, 24, generator=torch.Generator().manual_seed(1))
    dense = sd3_forward(tiny_sd3, clips, text, text_mask, pooled_sd3, t, dense_mask=True)
    blocks = sd3_forward(tiny_sd3, clips, text, text_mask, pooled_sd3, t)
    assert (blocks - dense).abs().max() <= 1e-5 * dense.abs().max() and dense.abs().max() > 0.1


# --------------------------------------------------------------------------------------------- SD3 DiT


def test_the_sd3_config_has_exactly_the_released_keys_and_shapes_after_the_remap():
    from longvid.models.pyramid_flow.dit_sd3 import build_sd3, remap_keys

    with torch.device("meta"):
        model = build_sd3()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    released = _released_keys("sd3-dit-keys.txt")
    assert ours == remap_keys(released)  # the 2-D sincos table is a persistent buffer: loaded, not recomputed
    assert all(block.attn.norm_added_q.eps == 1e-5 for block in model.transformer_blocks)


#: the tiny SD3 DiT of these tests (the single-file tests build the same one)
TINY_SD3 = dict(sample_size=32, num_layers=2, num_attention_heads=2, caption_projection_dim=128,
                joint_attention_dim=32, pooled_projection_dim=24, pos_embed_max_size=48)


@pytest.fixture(scope="module")
def tiny_sd3():
    from longvid.models.pyramid_flow.dit_sd3 import build_sd3

    torch.manual_seed(0)
    model = build_sd3(**TINY_SD3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def test_sd3_first_frame_equals_diffusers_sd3_forward(tiny_sd3):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from longvid.models.pyramid_flow.dit_sd3 import PyramidJointProcessor, sd3_forward

    torch.manual_seed(2)
    x, text, pooled, t = torch.randn(2, 16, 1, 16, 16), torch.randn(2, 5, 32), torch.randn(2, 24), torch.tensor([700.0] * 2)
    ours = sd3_forward(tiny_sd3, [x], text, torch.ones(2, 5, dtype=torch.long), pooled, t)
    # one frame, no padding: τ = 0 everywhere (RoPE is the identity) and the mask is all True, so Pyramid Flow's
    # forward is SD3's up to the order of text and vision tokens
    for block in tiny_sd3.transformer_blocks:
        block.attn.set_processor(JointAttnProcessor2_0())
    try:
        reference = tiny_sd3(hidden_states=x[:, :, 0], encoder_hidden_states=text, pooled_projections=pooled,
                             timestep=t, return_dict=False)[0]
    finally:
        for block in tiny_sd3.transformer_blocks:
            block.attn.set_processor(PyramidJointProcessor())
    assert (ours[:, :, 0] - reference).abs().max() < 1e-5 and reference.abs().max() > 0.1


@torch.no_grad()
def test_sd3_padded_text_is_inert_and_history_and_time_matter(tiny_sd3):
    from longvid.models.pyramid_flow.dit_sd3 import sd3_forward

    torch.manual_seed(3)
    clips = [torch.randn(2, 16, 2, 4, 4), torch.randn(2, 16, 1, 8, 8), torch.randn(2, 16, 1, 16, 16),
             torch.randn(2, 16, 1, 16, 16)]
    text, mask, pooled = torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]), torch.randn(2, 24)
    t = torch.tensor([500.0, 500.0])
    base = sd3_forward(tiny_sd3, clips, text, mask, pooled, t)
    padded = text.clone()
    padded[1, 2:] -= 3.0
    assert torch.equal(sd3_forward(tiny_sd3, clips, padded, mask, pooled, t), base)
    older = [c.clone() for c in clips]
    older[1] += 1.0  # the 1/2-resolution history frame
    assert (sd3_forward(tiny_sd3, older, text, mask, pooled, t) - base).abs().max() > 1e-3
    # the temporal RoPE: the same clips renumbered (one more history frame) change the output
    assert (sd3_forward(tiny_sd3, [clips[0][:, :, :1]] + clips, text, mask, pooled, t) - base).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------- causal VAE


def test_the_vae_has_exactly_the_released_keys_and_size():
    from longvid.models.pyramid_flow.vae import CausalVideoVAE

    with torch.device("meta"):
        vae = CausalVideoVAE()
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert ours == _released_keys("causal-vae-keys.txt")
    assert sum(p.numel() for p in vae.parameters()) == pytest.approx(0.3354e9, rel=1e-3)


@pytest.fixture(scope="module")
def tiny_vae():
    from longvid.models.pyramid_flow.vae import CausalVideoVAE

    torch.manual_seed(0)
    return CausalVideoVAE(channels=(8, 16, 16, 16), encoder_layers=1, decoder_layers=1, groups=4).eval()


@torch.no_grad()
def test_vae_compression_and_exact_chunked_decode(tiny_vae):
    x = torch.rand(1, 3, 17, 64, 64) * 2 - 1
    assert tiny_vae.encode(x, sample=False).shape == (1, 16, 3, 8, 8)  # 1 + 8k frames -> 1 + k latents
    with pytest.raises(ValueError, match="1 \\+ 8k"):
        tiny_vae.encode(x[:, :, :16])
    z = torch.randn(1, 16, 4, 8, 8)
    plain = tiny_vae.decode(z)
    assert plain.shape == (1, 3, 25, 64, 64) and plain.abs().max() <= 1
    for window in (1, 2, 3):
        chunks = list(tiny_vae.decode_chunks(z, window))
        assert chunks[0].shape[2] == 1 + 8 * window and all(c.shape[2] == 8 * window for c in chunks[1:-1])
        assert (torch.cat(chunks, 2) - plain).abs().max() < 1e-5
    # causal: the first frames do not depend on later latents
    later = z.clone()
    later[:, :, 2:] += 1.0
    assert torch.equal(tiny_vae.decode(later)[:, :, :9], plain[:, :, :9])


@torch.no_grad()
def test_vae_posterior_sampling_is_seeded_and_latent_stats_invert(tiny_vae):
    from longvid.models.pyramid_flow.vae import LATENT_STATS, denormalize, normalize

    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    a = tiny_vae.encode(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, tiny_vae.encode(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, tiny_vae.encode(x, sample=False))
    z = torch.randn(1, 16, 3, 4, 4)
    for stats in LATENT_STATS.values():
        n = normalize(z, stats)
        assert torch.allclose(denormalize(n, stats), z, atol=1e-6)
        assert torch.allclose(n[:, :, 0], (z[:, :, 0] - stats[0]) * stats[1])  # the image frame's own statistics
        assert torch.allclose(denormalize(n[:, :, 1:], stats, first_is_image=False), z[:, :, 1:], atol=1e-6)


# --------------------------------------------------------------------------------------------- the AR loop


def _cond(tiny_flux, seed, batch=2):
    from longvid.models.pyramid_flow.loop import TextCondition

    g = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(batch, 5, 32, generator=g), torch.ones(batch, 5, dtype=torch.long),
                         torch.randn(batch, 24, generator=g))


def _run(tiny_flux, seed=0, condition=None, **kw):
    from longvid.models.pyramid_flow.loop import UnitSettings, generate_units

    calls = []

    def dit(clips, text, mask, pooled, t):
        calls.append((len(clips), clips[-1].shape[0], tuple(clips[-1].shape[-2:]), float(t[0])))
        return flux_forward(tiny_flux, clips, text, mask, pooled, t)

    settings = kw.pop("settings", UnitSettings(image_steps=(2, 1, 1), video_steps=(1, 1, 1), guidance=4.0,
                                               video_guidance=2.0))
    cond = _cond(tiny_flux, 7)
    with torch.no_grad():
        out = generate_units(dit, condition or (lambda u: cond), (1, 16, 4, 16, 16), torch.Generator().manual_seed(seed),
                             settings, **kw)
    return out, calls


def test_t2v_runs_units_and_stages_as_planned(tiny_flux):
    out, calls = _run(tiny_flux)
    assert out.shape == (1, 16, 4, 16, 16) and torch.isfinite(out).all()
    assert len(calls) == 4 + 3 * 3  # unit 0: 2+1+1 steps; units 1..3: 1+1+1
    assert [c[2] for c in calls[:4]] == [(4, 4), (4, 4), (8, 8), (16, 16)]  # stages at 1/4, 1/2, full
    assert calls[0][3] == 1000.0 and calls[2][3] == 744.0 and calls[3][3] == 386.0
    assert all(c[1] == 2 for c in calls)  # CFG: [uncond, cond]
    assert [c[0] for c in calls[4:7]] == [2, 2, 2]  # unit 1: one history clip + the current one at every stage
    assert [c[0] for c in calls[-3:]] == [2, 3, 4]  # unit 3: [0..2 @1/4] | [0..1 @1/4, 2 @1/2] | [0 @1/4, 1 @1/2, 2]
    again, _ = _run(tiny_flux)
    other, _ = _run(tiny_flux, seed=1)
    assert torch.equal(out, again) and (out - other).abs().max() > 1e-3


def test_guidance_zero_turns_cfg_off_everywhere(tiny_flux):
    from longvid.models.pyramid_flow.loop import UnitSettings

    cond = _cond(tiny_flux, 7, batch=1)
    _, calls = _run(tiny_flux, condition=lambda u: cond,
                    settings=UnitSettings((1, 1, 1), (1, 1, 1), guidance=0.0, video_guidance=5.0))
    assert all(c[1] == 1 for c in calls)


def test_i2v_keeps_the_image_latent_as_unit_0(tiny_flux):
    image = torch.randn(1, 16, 1, 16, 16)
    out, calls = _run(tiny_flux, first=image)
    assert torch.equal(out[:, :, :1], image) and len(calls) == 3 * 3  # only the three video units are generated


def test_a_prompt_switch_changes_only_later_units(tiny_flux):
    a, b = _cond(tiny_flux, 7), _cond(tiny_flux, 8)
    base, _ = _run(tiny_flux, condition=lambda u: a)
    switched, _ = _run(tiny_flux, condition=lambda u: a if u < 2 else b)
    assert torch.equal(switched[:, :, :2], base[:, :, :2])
    assert (switched[:, :, 2:] - base[:, :, 2:]).abs().max() > 1e-3


def test_resume_at_a_unit_boundary_is_bit_identical(tiny_flux):
    states = {}
    full, _ = _run(tiny_flux, on_unit=lambda done, capture: states.setdefault(done, capture()))
    assert sorted(states) == [1, 2, 3, 4]
    resumed, calls = _run(tiny_flux, resume=states[2])
    assert torch.equal(resumed, full) and len(calls) == 2 * 3  # units 2 and 3 only


def test_a_history_window_caps_the_history_and_renumbers_it(tiny_flux):
    """history_window=2: units 0–2 see the whole history (it is short enough) and equal the official run; unit 3
    sees only units 1–2, exactly as a run whose first two units were those (so τ restarts at 0)."""
    from longvid.models.pyramid_flow.loop import UnitSettings

    settings = dict(image_steps=(2, 1, 1), video_steps=(1, 1, 1), guidance=4.0, video_guidance=2.0)
    full, _ = _run(tiny_flux)
    seen = []
    windowed, calls = _run(tiny_flux, settings=UnitSettings(**settings, history_window=2),
                           on_unit=lambda done, capture: seen.append(capture()))
    assert torch.equal(windowed[:, :, :3], full[:, :, :3])
    assert (windowed[:, :, 3] - full[:, :, 3]).abs().max() > 1e-3  # unit 3 lost unit 0
    # unit 3, stage 2: [1 @1/2, 2 @full] + current (the full history would be [0 @1/4, 1 @1/2, 2 @full])
    assert [c[0] for c in calls[-3:]] == [2, 3, 3]
    # the same unit from a state whose history is units 1–2 renumbered as 0–1: bit-identical
    from longvid.models.pyramid_flow.loop import UnitState

    state = seen[2]  # after units 0–2
    noise = torch.cat([state.noise[:, :, 1:], state.noise[:, :, :1]], 2)  # unit 3's noise at index 2 (4 units)
    shifted = UnitState(2, state.latents[:, :, 1:3], noise, state.generator_state)
    again, _ = _run(tiny_flux, settings=UnitSettings(**settings), resume=shifted)
    assert torch.equal(again[:, :, 2], windowed[:, :, 3])


@pytest.mark.parametrize("override, key, fragment", [
    (["video.num_frames=129"], "video.num_frames", "history_window"),
    (["video.num_frames=129", "model.options.history_window=16"], "model.options.history_window", "at most 15"),
    (["model.options.history_window=0"], "model.options.history_window", ">= 1"),
])
def test_lengths_beyond_the_trained_ones_need_a_history_window(override, key, fragment):
    from longvid.errors import RecipeError
    from longvid.recipe.resolve import resolve

    with pytest.raises(RecipeError) as err:
        resolve(_pyramid_recipe(), override)
    assert any(p.key == key and fragment in p.message for p in err.value.problems), str(err.value)
    recipe = resolve(_pyramid_recipe(), ["video.num_frames=257", "model.options.history_window=15"])
    assert recipe.video.num_frames == 257  # 33 units at 384p: allowed with the extension


# --------------------------------------------------------------------------------------------- loading


def _tiny_official_folder(root: Path, kind: str, tiny_flux, tiny_sd3, tiny_vae, vae_bin: bool = True) -> Path:
    """An official-layout folder at tiny sizes: the released key names, config.json, pickled VAE as miniflux has."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from longvid.models import tiny

    dit = root / "diffusion_transformer_384p"
    dit.mkdir(parents=True)
    if kind == "miniflux":
        state = {k: v.contiguous() for k, v in tiny_flux.state_dict().items()}
        config = {"_class_name": "PyramidFluxTransformer", **{k: tiny_flux.config[k] for k in (
            "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
            "pooled_projection_dim")}, "axes_dims_rope": list(tiny_flux.config.axes_dims_rope), "patch_size": 1,
            "in_channels": 64, "use_temporal_causal": True, "interp_condition_pos": True}
    else:
        released = {k.replace(".norm_added_q.", ".norm_add_q.").replace(".norm_added_k.", ".norm_add_k."): v
                    for k, v in tiny_sd3.state_dict().items()}
        state = {k: v.contiguous() for k, v in released.items()}
        config = {"_class_name": "PyramidDiffusionMMDiT", **{k: tiny_sd3.config[k] for k in (
            "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size")},
            "qk_norm": "rms_norm", "max_num_frames": 200, "pos_embed_type": "sincos"}
    save_file(state, str(dit / "diffusion_pytorch_model.safetensors"))
    (dit / "config.json").write_text(json.dumps(config))
    vae = root / "causal_video_vae"
    vae.mkdir()
    if vae_bin:
        torch.save(dict(tiny_vae.state_dict()), vae / "diffusion_pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in tiny_vae.state_dict().items()},
                  str(vae / "diffusion_pytorch_model.safetensors"))
    (vae / "config.json").write_text(json.dumps({"_class_name": "CausalVideoVAE", "norm_num_groups": 4}))
    clip_tok, t5_tok = tiny.clip_tokenizer(), tiny.t5_tokenizer(128)
    clip_cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=24, intermediate_size=37,
                    num_attention_heads=4, num_hidden_layers=1, vocab_size=len(clip_tok), max_position_embeddings=77)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    encoders = ([CLIPTextModel(CLIPTextConfig(**clip_cfg)), t5] if kind == "miniflux" else
                [CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg, projection_dim=8)),
                 CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg, projection_dim=16)), t5])
    for i, encoder in enumerate(encoders):
        suffix = "" if i == 0 else f"_{i + 1}"
        encoder.save_pretrained(root / f"text_encoder{suffix}")
        (t5_tok if encoder is t5 else clip_tok).save_pretrained(root / f"tokenizer{suffix}")
    return root


@pytest.mark.parametrize("kind", ["miniflux", "sd3"])
def test_an_official_layout_folder_loads_strictly(kind, tmp_path, tiny_flux, tiny_sd3, tiny_vae):
    from longvid.models.pyramid_flow.load import load_folder
    from longvid.models.pyramid_flow.text import encode

    root = _tiny_official_folder(tmp_path / kind, kind, tiny_flux, tiny_sd3, tiny_vae, vae_bin=kind == "miniflux")
    parts = load_folder(root, "diffusion_transformer_384p", torch.float32, torch.float32, torch.float32)
    assert parts["kind"] == kind
    reference = tiny_flux if kind == "miniflux" else tiny_sd3
    assert all(torch.equal(a, b) for a, b in zip(parts["dit"].state_dict().values(), reference.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(parts["vae"].state_dict().values(), tiny_vae.state_dict().values()))
    cond = encode(parts, ["a red fox", "a calm lake at dawn"], torch.device("cpu"))
    assert cond.text.shape == (2, 128, 32) and cond.mask.shape == (2, 128)
    assert cond.pooled.shape == (2, 24 if kind == "miniflux" else 8 + 16)  # CLIP-L pooled / CLIP-L + CLIP-G projected
    assert cond.mask[0].sum() < cond.mask[1].sum()  # the shorter prompt has more padding


def test_a_damaged_or_foreign_checkpoint_is_refused(tmp_path, tiny_flux, tiny_sd3, tiny_vae):
    from safetensors.torch import load_file, save_file

    from longvid.errors import ModelLoadError
    from longvid.models.pyramid_flow.load import load_folder

    root = _tiny_official_folder(tmp_path / "m", "miniflux", tiny_flux, tiny_sd3, tiny_vae)
    weights = root / "diffusion_transformer_384p" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("proj_out.bias")
    save_file(state, str(weights))
    with pytest.raises(ModelLoadError, match="missing 1: \\['proj_out.bias'\\]"):
        load_folder(root, "diffusion_transformer_384p", torch.float32, torch.float32, torch.float32)
    with pytest.raises(ModelLoadError, match="no diffusion_transformer_768p"):
        load_folder(root, "diffusion_transformer_768p", torch.float32, torch.float32, torch.float32)
    # a pickle with code in it is not a tensor checkpoint: weights_only refuses it
    (root / "causal_video_vae" / "diffusion_pytorch_model.bin").write_bytes(
        b"\x80\x04\x95\x1b\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.")
    from longvid.models.pyramid_flow.load import read_state

    with pytest.raises(ModelLoadError, match="not a plain tensor checkpoint"):
        read_state(root / "causal_video_vae")


# --------------------------------------------------------------------------------------------- through the engine


def _pyramid_recipe(**extra):
    m = {"model": {"family": "pyramid_flow", "path": "tiny:pyramid-flow", "options": {"image_steps": [1, 1, 1]}},
         "prompt": "a red fox", "video": {"num_frames": 25, "height": 64, "width": 64},
         "sampler": {"steps": 1, "guidance_scale": 4.0}, "runtime": {"device": "cpu"}, "seed": 3}
    m.update(extra)
    return m


def test_tiny_pyramid_flow_generates_an_mp4_of_1_plus_8k_frames(tmp_path):
    import imageio_ffmpeg

    from longvid import runner
    from longvid.recipe.resolve import resolve

    result = runner.generate(resolve(_pyramid_recipe(output={"dir": str(tmp_path), "name": "clip"})))
    assert result.latents.shape == (1, 16, 4, 8, 8) and torch.isfinite(result.latents).all()
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "clip.mp4"))
    assert next(reader)["size"] == (64, 64) and sum(1 for _ in reader) == 25  # 1 + 8 (latents - 1)
    sidecar = json.loads((tmp_path / "clip.json").read_text())
    assert sidecar["recipe"]["model"]["family"] == "pyramid_flow"


def test_prompt_keyframes_switch_at_their_unit():
    from longvid import runner
    from longvid.recipe.resolve import resolve

    adapter = runner.load_adapter(resolve(_pyramid_recipe()))
    try:
        one = runner.generate(resolve(_pyramid_recipe(prompt="a calm sea")), adapter=adapter, write=False).latents
        two = runner.generate(resolve(_pyramid_recipe(prompt={0: "a calm sea", 12: "a storm over the sea"})),
                              adapter=adapter, write=False).latents
    finally:
        adapter.close()
    assert torch.equal(two[:, :, :2], one[:, :, :2])  # frame 12 is in unit 2 (frames 9..16)
    assert (two[:, :, 2:] - one[:, :, 2:]).abs().max() > 1e-4


def test_the_quality_suffix_follows_the_option_per_run(monkeypatch):
    """model.options.prompt_suffix: the official ", hyper quality, Ultra HD, 8K" on the prompt (not the negative) by
    default, none with false, decided per run on one loaded model."""
    from longvid import runner
    from longvid.models.pyramid_flow import text
    from longvid.recipe.resolve import resolve

    seen = []
    real = text.encode
    monkeypatch.setattr(text, "encode", lambda components, prompts, device: seen.append(list(prompts)) or
                        real(components, prompts, device))
    adapter = runner.load_adapter(resolve(_pyramid_recipe()))
    try:
        for suffix in (True, False, True):
            recipe = resolve(_pyramid_recipe(), [f"model.options.prompt_suffix={str(suffix).lower()}",
                                                 "video.num_frames=1"])
            runner.generate(recipe, adapter=adapter, write=False)
    finally:
        adapter.close()
    official = "a red fox, hyper quality, Ultra HD, 8K"
    assert [p[0] for p in seen] == [official, "a red fox", official]
    assert all(p[1] == seen[0][1] and "hyper quality" not in p[1] for p in seen)


def test_a_checkpoint_at_a_unit_boundary_resumes_bit_identically(tmp_path):
    from longvid import runner
    from tests.engine.test_checkpoint import _interrupt_then_resume, _recipe

    uninterrupted = runner.generate(_recipe(_pyramid_recipe(), tmp_path / "a"))
    err, resumed = _interrupt_then_resume(_recipe(_pyramid_recipe(), tmp_path / "b"), "step", 2)
    assert "step 2/4" in str(err)  # steps count latent units
    assert torch.equal(resumed.latents, uninterrupted.latents)
    assert (tmp_path / "a" / "clip.mp4").read_bytes() == (tmp_path / "b" / "clip.mp4").read_bytes()


@pytest.mark.parametrize("override, key", [
    (["video.num_frames=129"], "video.num_frames"),  # beyond the 384p model's 16 trained latents
    (["video.num_frames=24"], "video.num_frames"),  # not 1 + 8k
    (["video.height=96"], "video.height"),  # not a multiple of 64
    (["model.dtype=float16"], "model.dtype"),
    (["model.variant=diffusion_transformer_512p"], "model.variant"),
    (["model.options.video_steps=[1,2]"], "model.options.video_steps"),
    (["model.options.bogus=1"], "model.options.bogus"),
    (["sampler.scheduler=DDIMScheduler"], "sampler.scheduler"),
    (["runtime.offload=group"], "runtime.offload"),
    (["methods.freelong={}"], "methods.freelong"),
    (["stages.base.height=64", "stages.refine.strength=0.5"], "stages"),
])
def test_pyramid_flow_recipes_are_checked_before_loading(override, key):
    from longvid.errors import RecipeError
    from longvid.recipe.resolve import resolve

    with pytest.raises(RecipeError) as err:
        resolve(_pyramid_recipe(), override)
    assert any(p.key == key for p in err.value.problems), str(err.value)


def test_options_are_refused_for_a_family_without_them():
    from longvid.errors import RecipeError
    from longvid.recipe.resolve import resolve

    with pytest.raises(RecipeError, match="model.options: wan takes no options"):
        resolve("wan-t2v-1.3b", ["model.options.image_steps=[1,1,1]"])
    with pytest.raises(RecipeError, match="model.variant"):
        resolve("wan-t2v-1.3b", ["model.variant=diffusion_transformer_384p"])


def _image(path: Path, color, size=(80, 48)) -> Path:
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


def test_image_to_video_starts_from_the_encoded_image(tmp_path):
    from longvid import runner
    from longvid.recipe.resolve import resolve

    red, blue = _image(tmp_path / "red.png", (220, 30, 30)), _image(tmp_path / "blue.jpg", (20, 40, 230))
    adapter = runner.load_adapter(resolve(_pyramid_recipe()))
    try:
        a = runner.generate(resolve(_pyramid_recipe(image=str(red))), adapter=adapter, write=False).latents
        again = runner.generate(resolve(_pyramid_recipe(image=str(red))), adapter=adapter, write=False).latents
        b = runner.generate(resolve(_pyramid_recipe(image=str(blue))), adapter=adapter, write=False).latents
        t2v = runner.generate(resolve(_pyramid_recipe()), adapter=adapter, write=False).latents
        # unit 0 is the image's latent: the same RNG plan (noise, then the posterior sample) gives it again
        g = torch.Generator().manual_seed(3)
        torch.randn((1, 16, 4, 8, 8), generator=g)  # the engine's noise draw comes first
        expected = adapter.encode_image(str(red), 64, 64, g)
    finally:
        adapter.close()
    assert torch.equal(a, again) and torch.equal(a[:, :, :1], expected)
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-3 and (a - t2v).abs().max() > 1e-3
    assert (a[:, :, 1:] - b[:, :, 1:]).abs().max() > 1e-4  # later units follow the image


def test_a_bad_image_is_refused_before_loading(tmp_path):
    from longvid.errors import RecipeError
    from longvid.recipe.resolve import resolve

    (tmp_path / "not.png").write_text("hello")
    _image(tmp_path / "tiny.png", (0, 0, 0), size=(4, 4))
    cases = {str(tmp_path / "missing.png"): "no image file", str(tmp_path / "not.png"): "not a readable image",
             str(tmp_path / "tiny.png"): "at least 8x8"}
    for path, message in cases.items():
        with pytest.raises(RecipeError, match=message):
            resolve(_pyramid_recipe(image=path))
    with pytest.raises(RecipeError, match="image: wan does not generate from an image"):
        resolve("wan-t2v-1.3b", options={"image": str(tmp_path / "not.png")})
    with pytest.raises(RecipeError, match=r"no image file '\$\{oc.env:HOME\}/x.png'"):  # a path is never evaluated
        resolve(_pyramid_recipe(image="${oc.env:HOME}/x.png"))
