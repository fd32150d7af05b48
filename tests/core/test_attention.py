"""Frame-windowed attention: window bounds and blocked SDPA against a float64 dense-mask reference."""

import pytest
import torch
import torch.nn.functional as F

from longvid.core.attention import dense_window_reference, window_bounds, windowed_attention


def _rows(lo, hi, i):
    return (int(lo[i]), int(hi[i]))


def test_window_bounds_adjusted_f128():
    lo, hi = window_bounds(128, 16, "adjusted")
    assert lo.dtype == torch.int64 and lo.shape == (128,)
    assert _rows(lo, hi, 0) == (0, 16)  # row 0 -> frames 0..15
    assert _rows(lo, hi, 7) == (0, 16)
    assert _rows(lo, hi, 8) == (0, 17)
    assert _rows(lo, hi, 64) == (56, 73)
    assert _rows(lo, hi, 119) == (111, 128)
    assert _rows(lo, hi, 120) == (112, 128)
    assert _rows(lo, hi, 127) == (112, 128)
    width = (hi - lo).tolist()
    assert width[:8] == [16] * 8 and width[120:] == [16] * 8 and width[8:120] == [17] * 112


def test_window_bounds_strict_f128():
    lo, hi = window_bounds(128, 16, "strict")
    assert _rows(lo, hi, 0) == (0, 9)  # |i - j| <= 8, cut at the ends
    assert _rows(lo, hi, 8) == (0, 17)
    assert _rows(lo, hi, 64) == (56, 73)
    assert _rows(lo, hi, 127) == (119, 128)
    width = (hi - lo).tolist()
    assert width[:9] == list(range(9, 18)) and width[8:120] == [17] * 112 and width[-1] == 9


@pytest.mark.parametrize("frames", [1, 5, 16])
def test_window_bounds_adjusted_short_sees_everything(frames):
    lo, hi = window_bounds(frames, 16, "adjusted")
    assert lo.eq(0).all() and hi.eq(frames).all()
    lo_s, hi_s = window_bounds(frames, 16, "strict")
    assert frames < 9 or not hi_s.eq(frames).all()  # strict is not full at F=16


def test_window_bounds_rejects_bad_mode():
    with pytest.raises(ValueError):
        window_bounds(8, 4, "wide")


def test_dense_reference_matches_per_row_loop():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 12, 4, generator=g, dtype=torch.float64) for _ in range(3))
    lo, hi = window_bounds(6, 3, "strict")  # 2 tokens per frame
    ref = dense_window_reference(q, k, v, lo, hi, tokens_per_frame=2)
    for s in range(12):
        f = s // 2
        ks, vs = k[0, 0, 2 * lo[f] : 2 * hi[f]], v[0, 0, 2 * lo[f] : 2 * hi[f]]
        want = torch.softmax(q[0, 0, s] @ ks.T / 2.0, -1) @ vs
        torch.testing.assert_close(ref[0, 0, s], want)


@pytest.mark.parametrize("frames", [5, 16, 17, 64, 100, 257])
@pytest.mark.parametrize("mode", ["adjusted", "strict"])
def test_windowed_attention_matches_dense_reference(frames, mode):
    g = torch.Generator().manual_seed(frames)
    lo, hi = window_bounds(frames, 16, mode)
    for tpf, batch in ((1, 3), (6, 1)):
        q, k, v = (torch.randn(batch, 2, frames * tpf, 8, generator=g) for _ in range(3))
        out = windowed_attention(q, k, v, lo, hi, tokens_per_frame=tpf)
        ref = dense_window_reference(q, k, v, lo, hi, tokens_per_frame=tpf)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert (out.double() - ref).abs().max().item() <= 1e-5, (frames, mode, tpf, batch)


@pytest.mark.parametrize("block_frames", [1, 3, 7, 64])
def test_windowed_attention_any_block_size_strided_inputs(block_frames):
    g = torch.Generator().manual_seed(2)
    # (N, S, heads, D) memory viewed as (N, heads, S, D), as diffusers' processors produce it
    q, k, v = (torch.randn(2, 40, 3, 8, generator=g).transpose(1, 2) for _ in range(3))
    lo, hi = window_bounds(20, 6, "adjusted")
    out = windowed_attention(q, k, v, lo, hi, tokens_per_frame=2, block_frames=block_frames)
    ref = dense_window_reference(q, k, v, lo, hi, tokens_per_frame=2)
    assert (out.double() - ref).abs().max().item() <= 1e-5
    buf = torch.full((2, 40, 3, 8), float("nan")).transpose(1, 2)  # write into a given strided buffer
    assert windowed_attention(q, k, v, lo, hi, 2, block_frames, out=buf) is buf
    assert torch.equal(buf, out)


def test_windowed_attention_full_window_is_plain_sdpa():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 12, 8, generator=g) for _ in range(3))
    lo, hi = window_bounds(12, 16, "adjusted")
    assert torch.equal(windowed_attention(q, k, v, lo, hi), F.scaled_dot_product_attention(q, k, v))


def test_windowed_attention_is_local():
    """A key outside every window of frame 0 must not change frame 0's output."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 40, 4, generator=g) for _ in range(3))
    lo, hi = window_bounds(40, 8, "strict")
    out = windowed_attention(q, k, v, lo, hi)
    v2 = v.clone()
    v2[:, :, 30] += 100.0
    out2 = windowed_attention(q, k, v2, lo, hi)
    assert torch.equal(out[:, :, :20], out2[:, :, :20])
    assert not torch.allclose(out[:, :, 30], out2[:, :, 30])


def test_windowed_attention_rejects_bad_shape():
    q = torch.randn(1, 1, 10, 4)
    lo, hi = window_bounds(4, 2)
    with pytest.raises(ValueError):
        windowed_attention(q, q, q, lo, hi, tokens_per_frame=3)
