"""Context windows: views, weights, fusion, the per-layer processor and the block-level hook."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock, FreeNoiseTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import SinusoidalPositionalEmbedding

from longvid.core.windows import (
    BLOCK_HOOK_NAME,
    WindowFusedAttnProcessor,
    apply_block_fusion,
    context_views,
    frame_weight_counts,
    fuse,
    fusion_plan,
    remove_block_fusion,
    window_weights,
)

C, HEADS = 32, 2
PYRAMID_16 = [1, 2, 3, 4, 5, 6, 7, 8, 8, 7, 6, 5, 4, 3, 2, 1]


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights everywhere (LayerNorms and zero-initialised biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def _x(n: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, frames, C, generator=torch.Generator().manual_seed(seed))  # (N, F, C)


# ---------------------------------------------------------------------------------------------- views/weights


def test_context_views():
    assert context_views(64, 16, 4) == [(s, s + 16) for s in range(0, 49, 4)]
    assert context_views(26, 16, 4) == [(0, 16), (4, 20), (8, 24), (10, 26)]
    assert context_views(130, 16, 4)[-2:] == [(112, 128), (114, 130)]
    assert context_views(16, 16, 4) == [(0, 16)]
    assert context_views(9, 16, 4) == [(0, 9)]
    assert context_views(81, 21, 5)[-1] == (60, 81)


def test_window_weights():
    assert window_weights(16, "pyramid").tolist() == PYRAMID_16
    assert window_weights(5, "pyramid").tolist() == [1, 2, 3, 2, 1]
    assert window_weights(4, "flat").tolist() == [1, 1, 1, 1]
    assert window_weights(4, "delayed_reverse_sawtooth").tolist() == [0.01, 2, 2, 1]
    assert window_weights(5, "delayed_reverse_sawtooth").tolist() == [0.01, 0.01, 3, 2, 1]
    for n in range(1, 24):
        for scheme in ("pyramid", "flat", "delayed_reverse_sawtooth"):
            assert window_weights(n, scheme).numel() == n
    with pytest.raises(ValueError, match="unknown weighting"):
        window_weights(16, "triangle")


def test_frame_weight_counts_f128():
    counts = frame_weight_counts(128, 16, 4).tolist()
    assert counts[:14] == [1, 2, 3, 4, 6, 8, 10, 12, 14, 15, 16, 17, 18, 18]
    assert counts[12:116] == [18] * 104  # constant interior
    assert counts[-12:] == counts[:12][::-1]


def test_hand_checkable_fusion_f24():
    """Notes §5 case 7: views (0,16), (4,20), (8,24) output the constants 0, 1, 2."""
    plan = fusion_plan(24, 16, 4)
    assert plan.views == ((0, 16), (4, 20), (8, 24))
    outs = [torch.full((1, 16, 1), float(i), dtype=torch.float64) for i in range(3)]
    fused = fuse(outs, plan, dim=1)[0, :, 0]
    expected = {4: 1 / 6, 10: 13 / 16, 12: 18 / 17, 16: 5 / 3, 20: 2.0}
    for frame, value in expected.items():
        assert fused[frame].item() == pytest.approx(value, abs=1e-12), frame
    assert frame_weight_counts(24, 16, 4)[[4, 10, 12]].tolist() == [6, 16, 17]


def test_tail_view_uses_weight_slice():
    """F=27: the tail view (11, 27) alone fills frames 24..26, with weights w[-3:] = [3, 2, 1]."""
    plan = fusion_plan(27, 16, 4)
    assert plan.views[-1] == (11, 27)
    assert plan.weights[-1].tolist() == [0] * 13 + [3, 2, 1]
    outs = [torch.full((1, 16, 1), float(i + 1)) for i in range(len(plan.views))]
    assert fuse(outs, plan)[0, 24:, 0].tolist() == [4.0, 4.0, 4.0]  # the tail view's output, unscaled


# ------------------------------------------------------------------------------------------ attention processor


def _attention(seed: int = 1, qk_norm: str | None = None) -> Attention:
    attn = Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS, bias=True, out_bias=True, qk_norm=qk_norm)
    return _randomize(attn, seed)


def _vanilla(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    attn.set_processor(AttnProcessor2_0())
    return attn(x)


def _reference_windowed(attn: Attention, x: torch.Tensor, views, pe=None) -> torch.Tensor:
    """Straightforward per-window reference: slice, (add pe[:L],) project, attend, weight, average, to_out.

    Weights are the pyramid; a tail view (start not on the stride grid) only fills frames no earlier view
    covered, with the matching slice of its weights.
    """
    n, frames, _ = x.shape
    total = torch.zeros(n, frames, C)
    count = torch.zeros(1, frames, 1)
    covered = 0
    for start, end in views:
        length = end - start
        xw = x[:, start:end] + (pe[:length] if pe is not None else 0)
        q, k, v = (p(xw).view(n, length, HEADS, -1).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, C)
        w = torch.tensor(PYRAMID_16[:length] if length == 16 else [1.0] * length).view(1, -1, 1)
        skip = covered - start if start % 4 else 0  # the tail view skips frames earlier views covered
        total[:, start + skip : end] += (o * w)[:, skip:]
        count[:, start + skip : end] += w[:, skip:]
        covered = end
    return attn.to_out[0](total / count)


@pytest.mark.parametrize("frames", [16, 11])
def test_processor_is_vanilla_up_to_window(frames):
    attn, x = _attention(), _x(6, frames)
    expected = _vanilla(attn, x)
    attn.set_processor(WindowFusedAttnProcessor(16, 4))
    assert (attn(x) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("frames", [64, 26])
def test_processor_equals_per_window_reference(frames):
    attn, x = _attention(), _x(6, frames)
    expected = _reference_windowed(attn, x, context_views(frames, 16, 4))
    attn.set_processor(WindowFusedAttnProcessor(16, 4))
    out = attn(x)
    assert (out - expected).abs().max() <= 1e-5
    assert (out - _vanilla(attn, x)).abs().max() > 1e-3  # windowing changes the result


@pytest.mark.parametrize("qk_norm", [None, "layer_norm"])
def test_processor_window_local_pos_embed(qk_norm):
    attn, x = _attention(qk_norm=qk_norm), _x(6, 64)
    pos = SinusoidalPositionalEmbedding(C, max_seq_length=32)
    expected = _reference_windowed(attn, x, context_views(64, 16, 4), pe=pos.pe[0])
    attn.set_processor(WindowFusedAttnProcessor(16, 4, pos_embed=pos))
    out = attn(x)
    assert (out - expected).abs().max() <= 1e-5
    assert (out - _reference_windowed(attn, x, context_views(64, 16, 4))).abs().max() > 1e-3


def test_processor_pos_embed_short_clip_is_vanilla_with_pe():
    attn, x = _attention(), _x(4, 12)
    pos = SinusoidalPositionalEmbedding(C, max_seq_length=32)
    expected = _vanilla(attn, pos(x))
    attn.set_processor(WindowFusedAttnProcessor(16, 4, pos_embed=pos))
    assert (attn(x) - expected).abs().max() <= 1e-5


def test_processor_rejects_cross_attention():
    attn = _attention()
    attn.set_processor(WindowFusedAttnProcessor(16, 4))
    with pytest.raises(ValueError, match="self-attention"):
        attn(_x(2, 20), encoder_hidden_states=_x(2, 5))


# ------------------------------------------------------------------------------------------------ block fusion

BLOCK_KW = dict(
    dim=C,
    num_attention_heads=HEADS,
    attention_head_dim=C // HEADS,
    double_self_attention=True,
    positional_embeddings="sinusoidal",
    num_positional_embeddings=32,
)


def _blocks(seed: int = 2):
    """A motion-module-like BasicTransformerBlock and diffusers' FreeNoise block with the same weights."""
    basic = _randomize(BasicTransformerBlock(**BLOCK_KW), seed)
    freenoise = FreeNoiseTransformerBlock(**BLOCK_KW, context_length=16, context_stride=4).eval()
    freenoise.load_state_dict(basic.state_dict())
    return basic, freenoise


def _reference_block(block: BasicTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """Correct block fusion: per view attn1/attn2 with residuals (pe restarting at 0), weighted average with the
    tail view filling only its uncovered frames with weights w[-k:], then norm3 → ff → +residual."""
    n, frames, _ = x.shape
    total, count, covered = torch.zeros_like(x), torch.zeros(1, frames, 1), 0
    for start, end in context_views(frames, 16, 4):
        h = x[:, start:end]
        h = block.attn1(block.pos_embed(block.norm1(h))) + h
        h = block.attn2(block.pos_embed(block.norm2(h))) + h
        w = torch.tensor(PYRAMID_16, dtype=torch.float32).view(1, -1, 1)
        skip = covered - start if start % 4 else 0  # the tail view skips frames earlier views covered
        total[:, start + skip : end] += (h * w)[:, skip:]
        count[:, start + skip : end] += w[:, skip:]
        covered = end
    fused = total / count
    return block.ff(block.norm3(fused)) + fused


@pytest.mark.parametrize("frames", [16, 25, 64])
def test_block_fusion_equals_diffusers_freenoise_block(frames):
    basic, freenoise = _blocks()
    x = _x(3, frames)
    with torch.no_grad():
        expected = freenoise(x)
        handle = apply_block_fusion(basic, 16, 4, "pyramid")
        out = basic(x)
    handle.remove()
    assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("frames,tail_scale", [(26, [0.5]), (27, [2 / 3, 1 / 3])])
def test_block_fusion_fixes_diffusers_tail_weights(frames, tail_scale):
    basic, freenoise = _blocks()
    x = _x(3, frames)
    k = len(tail_scale)
    with torch.no_grad():
        diffusers_out = freenoise(x)
        reference = _reference_block(basic, x)
        apply_block_fusion(basic, 16, 4)
        out = basic(x)
    assert (out - reference).abs().max() <= 1e-5
    assert (diffusers_out[:, :-k] - reference[:, :-k]).abs().max() <= 1e-5  # same before the tail
    assert (diffusers_out[:, -k:] - reference[:, -k:]).abs().amax(dim=(0, 2)).min() > 1e-2  # diffusers is off

    # With the FF zeroed the block output is the fused state itself: diffusers' tail is ours × w_j / w_{L-k}.
    with torch.no_grad():
        for block in (basic, freenoise):
            block.ff.net[-1].weight.zero_()
            block.ff.net[-1].bias.zero_()
        ratio = freenoise(x)[:, -k:] / basic(x)[:, -k:]  # (N, k, C)
    for j, scale in enumerate(tail_scale):
        assert ratio[:, j].flatten().tolist() == pytest.approx([scale] * ratio[:, j].numel(), rel=1e-4)


def test_block_fusion_short_clip_is_vanilla():
    basic, _ = _blocks()
    x = _x(3, 12)
    with torch.no_grad():
        expected = basic(x)
        apply_block_fusion(basic, 16, 4)
        assert torch.equal(basic(x), expected)


def test_block_fusion_remove_restores_bit_exactly():
    basic, _ = _blocks()
    x = _x(3, 30)  # ≤ 32 so the vanilla block (global positions) can run it too
    with torch.no_grad():
        before = basic(x)
        handle = apply_block_fusion(basic, 16, 4)
        assert basic._diffusers_hook.get_hook(BLOCK_HOOK_NAME) is not None
        fused = basic(x)
        handle.remove()
        after = basic(x)
        remove_block_fusion(basic)  # idempotent
    assert not torch.allclose(fused, before)
    assert torch.equal(after, before)
    assert basic._diffusers_hook.get_hook(BLOCK_HOOK_NAME) is None


def test_block_fusion_rejects_other_norms():
    block = BasicTransformerBlock(C, HEADS, C // HEADS, norm_type="ada_norm", num_embeds_ada_norm=10)
    with pytest.raises(ValueError, match="layer_norm"):
        apply_block_fusion(block)


@pytest.mark.parametrize("frames", [27, 64])
def test_block_fusion_row_chunks_equal_one_batch(frames):
    """The views are batched per chunk of B·H·W rows; chunking (here one row at a time) changes nothing."""
    basic, _ = _blocks()
    x = _x(3, frames)
    with torch.no_grad():
        expected = _reference_block(basic, x)
        handle = apply_block_fusion(basic, 16, 4, "pyramid", chunk_bytes=1)
        out = basic(x)
    handle.remove()
    assert (out - expected).abs().max() <= 1e-5
