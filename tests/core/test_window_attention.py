"""FreeNoise per-layer window fusion (WindowFusedAttnProcessor) against a per-window reference."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import SinusoidalPositionalEmbedding

from longvid.core.window_attention import WindowFusedAttnProcessor
from longvid.core.windows import context_views
from tests.core.window_helpers import C, HEADS, PYRAMID_16, _randomize, _x


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


def _reference_plan(attn: Attention, x: torch.Tensor, window: int, stride: int, pe=None) -> torch.Tensor:
    """Per-view reference for any window/stride: every view of the fusion plan sliced, (pe added,) projected and
    attended alone, then averaged per frame with the plan's normalized weights and projected by to_out."""
    from longvid.core.windows import fusion_plan

    n, frames, _ = x.shape
    plan = fusion_plan(frames, window, stride)
    total = torch.zeros(n, frames, C)
    for (start, end), w in zip(plan.views, plan.normalized):
        xw = x[:, start:end] + (pe[: end - start] if pe is not None else 0)
        q, k, v = (p(xw).view(n, end - start, HEADS, -1).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, end - start, C)  # (N, L, C)
        total[:, start:end] += o * w.float().view(1, -1, 1)
    return attn.to_out[0](total)


@pytest.mark.parametrize("window, stride, frames", [(12, 5, 40), (16, 4, 30), (8, 8, 24), (6, 4, 19), (12, 4, 40)])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
@pytest.mark.parametrize("grad", [True, False])
def test_processor_any_geometry_and_chunking(window, stride, frames, chunk_bytes, grad):
    """Windows that are not a multiple of the stride (per-view fold), tails, stride = window, and one row per
    chunk (chunk_bytes=1) all give the per-view result, with autograd (the SDPA path) and without it (the CPU
    matmul path where the stride divides window and frames, the SDPA path elsewhere)."""
    attn, x = _attention(), _x(5, frames)
    expected = _reference_plan(attn, x, window, stride)
    attn.set_processor(WindowFusedAttnProcessor(window, stride, chunk_bytes=chunk_bytes))
    with torch.set_grad_enabled(grad):
        assert (attn(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("window, stride, frames", [(16, 4, 64), (12, 4, 40), (8, 8, 24), (16, 4, 20)])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_processor_matmul_path(window, stride, frames, chunk_bytes, bias, monkeypatch):
    """Without autograd on a CPU, views that tile the rows are attended by batched matmuls (no SDPA call at all):
    the per-view result, with and without projection biases, one or several rows per chunk."""
    attn, x = _attention(), _x(5, frames)
    if not bias:
        for p in (attn.to_q, attn.to_k, attn.to_v):
            p.bias = None
    expected = _reference_plan(attn, x, window, stride)
    attn.set_processor(WindowFusedAttnProcessor(window, stride, chunk_bytes=chunk_bytes))

    def no_sdpa(*args, **kwargs):
        raise AssertionError("the matmul path must not call SDPA")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    with torch.inference_mode():
        assert (attn(x) - expected).abs().max() <= 1e-5


def test_matmul_path_partial_chunks_keep_rows_apart():
    """The CPU matmul core writes its output into q's storage chunk by chunk: with two rows per chunk over five
    rows (the last chunk partial) every row is still its own per-view result, the input is untouched, and a
    non-finite row stays in its row (the view slots that cross into the next row are zeroed, not weighted by
    0: inf · 0 would carry it over)."""
    attn, x = _attention(), _x(5, 64)
    per_row = HEADS * (64 // 4) * 16 * (C // HEADS) * 4  # one row's view slots, all heads, float32
    attn.set_processor(WindowFusedAttnProcessor(16, 4, chunk_bytes=2 * per_row))
    expected = _reference_plan(attn, x, 16, 4)
    before = x.clone()
    with torch.inference_mode():
        out = attn(x)
    assert (out - expected).abs().max() <= 1e-5 and torch.equal(x, before)
    bad = x.clone()
    bad[1, :3] = float("inf")  # row 1's first frames: row 0's crossing slots read them
    for chunk_bytes in (None, 2 * per_row):
        attn.set_processor(WindowFusedAttnProcessor(16, 4, chunk_bytes=chunk_bytes))
        with torch.inference_mode():
            out = attn(bad)
        for row in (0, 2, 3, 4):
            assert (out[row] - expected[row]).abs().max() <= 1e-5, (chunk_bytes, row)


@pytest.mark.parametrize("frames", [30, 64])
def test_processor_pos_embed_with_tail_and_chunks(frames):
    attn, x = _attention(qk_norm="layer_norm"), _x(5, frames)
    pos = SinusoidalPositionalEmbedding(C, max_seq_length=32)
    expected = _reference_plan(attn, x, 16, 4, pe=pos.pe[0])
    attn.set_processor(WindowFusedAttnProcessor(16, 4, pos_embed=pos, chunk_bytes=1))
    assert (attn(x) - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------ autograd modes


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "plain"])
def test_processor_runs_in_every_autograd_mode(mode):
    """Inference mode (weights made outside it), no_grad and plain (autograd) mode all run and agree, the stacked
    q/k/v weight cache included (it is built in one mode and reused in the next)."""
    attn, x = _attention(), _x(3, 40)
    processor = WindowFusedAttnProcessor(16, 4)
    attn.set_processor(processor)
    expected = _reference_plan(attn, x, 16, 4)
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(mode)
    with ctx if ctx is not None else torch.enable_grad():
        out = attn(x)
        again = attn(x)
    assert (out - expected).abs().max() <= 1e-5 and torch.equal(out, again)
    assert out.requires_grad == (mode == "plain")


def test_stacked_projection_follows_weight_edits():
    """The stacked q/k/v weight is rebuilt after an in-place weight edit (a fused LoRA bumps the version)."""
    attn, x = _attention(), _x(3, 40)
    attn.set_processor(WindowFusedAttnProcessor(16, 4))
    with torch.no_grad():
        before = attn(x)
        attn.to_k.weight.mul_(1.5)
        after = attn(x)
    expected = _reference_plan(attn, x, 16, 4)
    assert (after - expected).abs().max() <= 1e-5 and (after - before).abs().max() > 1e-3
