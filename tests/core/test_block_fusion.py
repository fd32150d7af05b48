"""FreeNoise per-block window fusion (a diffusers ModelHook) against diffusers' FreeNoiseTransformerBlock."""

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock, FreeNoiseTransformerBlock

from longvid.core.block_fusion import BLOCK_HOOK_NAME, apply_block_fusion, remove_block_fusion
from longvid.core.windows import context_views
from tests.core.window_helpers import C, HEADS, PYRAMID_16, _randomize, _x


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


@pytest.mark.parametrize("frames", [25, 64])
def test_shared_projection_equals_the_per_view_path(frames):
    """norm1 and attn1's q/k/v once over all frames (+ the projected window-local pe) == every view alone."""
    basic, _ = _blocks()
    x = _x(3, frames)
    outs = {}
    for shared in (True, False):
        handle = apply_block_fusion(basic, 16, 4, "pyramid", shared_projection=shared)
        with torch.no_grad():
            outs[shared] = basic(x)
        handle.remove()
    assert (outs[True] - outs[False]).abs().max() <= 1e-5
    assert outs[True].abs().max() > 0.1


def test_a_non_default_attn1_processor_takes_the_exact_path():
    """Where attn1 is not diffusers' default processor, W(h + pe) = Wh + Wpe may not hold: exact path, bit for bit."""
    from diffusers.models.attention_processor import AttnProcessor

    basic, _ = _blocks()
    basic.attn1.set_processor(AttnProcessor())  # another (here: equivalent) processor, e.g. a method's
    x = _x(2, 40)
    outs = {}
    for shared in (True, False):
        handle = apply_block_fusion(basic, 16, 4, "pyramid", shared_projection=shared)
        with torch.no_grad():
            outs[shared] = basic(x)
        handle.remove()
    assert torch.equal(outs[True], outs[False])


def test_a_non_default_attn2_processor_runs_attn2_as_the_module():
    """attn1 shared, attn2 through its own (here: equivalent) processor: equal to the per-view path."""
    from diffusers.models.attention_processor import AttnProcessor

    basic, _ = _blocks()
    basic.attn2.set_processor(AttnProcessor())
    x = _x(2, 40)
    outs = {}
    for shared in (True, False):
        handle = apply_block_fusion(basic, 16, 4, "pyramid", shared_projection=shared)
        with torch.no_grad():
            outs[shared] = basic(x)
        handle.remove()
    assert (outs[True] - outs[False]).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["grad", "inference"])
def test_shared_path_under_autograd_and_inference_mode(mode):
    """The shared path's in-place steps are on fresh tensors: gradients flow, and inference mode runs it too."""
    basic, _ = _blocks()
    x = _x(2, 28)
    with torch.no_grad():
        expected = _reference_block(basic, x)
    apply_block_fusion(basic, 16, 4)
    if mode == "grad":
        x.requires_grad_(True)
        out = basic(x)
        out.square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    else:
        with torch.inference_mode():
            out = basic(x)
    assert (out.detach() - expected).abs().max() <= 1e-5
