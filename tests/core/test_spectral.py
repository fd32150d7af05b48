"""FreeLong filter, blend and attention op: reference values from notes/freelong-freenoise.md section 5."""

import pytest
import torch
import torch.nn.functional as F

from longvid.core.attention import window_bounds, windowed_attention
from longvid.core.context import TokenLayout
from longvid.core.spectral import (
    LowPass,
    SpectralBlendAttention,
    freq_mix_3d_reference,
    gaussian_low_pass_filter,
    spectral_blend,
)


# ----------------------------------------------------------------------------------- section 5, case 1
def _case1():
    b, c, t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (1, 2, 16, 5, 8)), indexing="ij")
    glob = torch.sin(0.1 * t + 0.3 * h + 0.5 * w + c)
    loc = torch.cos(0.2 * t * h + 0.7 * w - c) + 0.05 * t
    return glob, loc


CASE1 = {  # d_s: (sum P, sum y, sum |y|, y[0,0,0,0,0], y[0,1,7,2,3], y[0,0,15,4,7])
    0.25: (19.6608, -13.13024, 753.88556, 0.700573, -0.816408, -0.147931),
    0.5: (70.55116, -138.10791, 733.70740, 0.429804, -0.816196, -0.350965),
}


def _check_case1(y, want):
    _, s, sa, y0, y1, y2 = want
    assert y.sum().item() == pytest.approx(s, abs=2e-4)
    assert y.abs().sum().item() == pytest.approx(sa, abs=2e-3)
    assert y[0, 0, 0, 0, 0].item() == pytest.approx(y0, abs=2e-6)
    assert y[0, 1, 7, 2, 3].item() == pytest.approx(y1, abs=2e-6)
    assert y[0, 0, 15, 4, 7].item() == pytest.approx(y2, abs=2e-6)


@pytest.mark.parametrize("d_s", [0.25, 0.5])
def test_case1_reference_blend(d_s):
    glob, loc = _case1()
    p = gaussian_low_pass_filter([16, 5, 8], d_s, 0.25)
    assert p.sum().item() == pytest.approx(CASE1[d_s][0], abs=1e-4)
    _check_case1(freq_mix_3d_reference(glob, loc, p), CASE1[d_s])


@pytest.mark.parametrize("d_s", [0.25, 0.5])
@pytest.mark.parametrize("method", ["auto", "separable", "rfft"])
def test_case1_spectral_blend_official_grid(d_s, method):
    glob, loc = _case1()
    _check_case1(spectral_blend(glob, loc, (d_s, 0.25), grid="official", method=method), CASE1[d_s])
    _check_case1(spectral_blend(glob, loc, gaussian_low_pass_filter([16, 5, 8], d_s, 0.25)), CASE1[d_s])


# ----------------------------------------------------------------------------------- section 5, case 2
def test_case2_filter_values():
    p = gaussian_low_pass_filter([128, 20, 32])
    assert p.shape == (128, 20, 32) and p.dtype == torch.float32
    assert p.max().item() == 1.0 and p[64, 10, 16].item() == 1.0
    assert p[63, 10, 16].item() == pytest.approx(0.9980488, abs=1e-7)
    assert p[65, 10, 16].item() == pytest.approx(0.9980488, abs=1e-7)
    assert p[0, 0, 0].item() == pytest.approx(3.775e-11, rel=1e-3)
    assert p.mean().item() == pytest.approx(0.0307545, abs=1e-7)
    odd = gaussian_low_pass_filter([128, 5, 8])
    assert odd.max().item() == pytest.approx(0.7261491, abs=1e-7)  # odd-H quirk: DC bin below 1


def test_filter_centered_grid_and_zero():
    for shape in ([128, 5, 8], [17, 5, 9], [16, 20, 32]):
        p = gaussian_low_pass_filter(shape, grid="centered")
        assert p[shape[0] // 2, shape[1] // 2, shape[2] // 2].item() == 1.0 and p.max().item() == 1.0
    even = [16, 20, 32]  # both grids agree on even sizes
    assert torch.equal(gaussian_low_pass_filter(even, grid="centered"), gaussian_low_pass_filter(even))
    assert not gaussian_low_pass_filter([8, 4, 4], d_s=0.0).any()
    assert not gaussian_low_pass_filter([8, 4, 4], d_t=0.0).any()
    p64 = gaussian_low_pass_filter([8, 4, 4], dtype=torch.float64)
    assert p64.dtype == torch.float64


# ----------------------------------------------------------------------------------- section 5, case 3
def test_case3_seeded_blend_default_filter():
    gen = torch.Generator().manual_seed(0)
    glob = torch.randn(2, 4, 128, 5, 8, generator=gen)
    loc = torch.randn(2, 4, 128, 5, 8, generator=gen)
    p = gaussian_low_pass_filter([128, 5, 8], 0.25, 0.25)
    for out in (freq_mix_3d_reference(glob, loc, p), spectral_blend(glob, loc, (0.25, 0.25))):
        assert out.sum().item() == pytest.approx(-230.35147, abs=5e-3)
        assert out.abs().sum().item() == pytest.approx(31929.379, abs=5e-2)
        torch.testing.assert_close(out.flatten()[:3], torch.tensor([-0.71574, 0.49888, -0.14197]), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------- fast blend == reference
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 16, 6, 8), (1, 4, 17, 10, 16), (2, 2, 16, 5, 8), (1, 3, 12, 4, 7), (1, 2, 17, 5, 9), (1, 2, 9, 3, 5)],
)
@pytest.mark.parametrize("grid", ["official", "centered"])
def test_spectral_blend_matches_reference(shape, grid):
    g = torch.Generator().manual_seed(sum(shape))
    glob, loc = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    for d_s, d_t in ((0.25, 0.25), (0.5, 0.1)):
        ref = freq_mix_3d_reference(glob.double(), loc.double(), gaussian_low_pass_filter(shape[2:], d_s, d_t, grid, dtype=torch.float64))
        for chunk in (None, 1, shape[1]):
            out = spectral_blend(glob, loc, (d_s, d_t), grid=grid, channel_chunk=chunk)
            assert out.dtype == torch.float32
            assert (out.double() - ref).abs().max().item() <= 1e-5, (shape, grid, d_s, chunk)
        out = spectral_blend(glob, loc, gaussian_low_pass_filter(shape[2:], d_s, d_t, grid), channel_chunk=2)
        assert (out.double() - ref).abs().max().item() <= 1e-5


def test_method_choice_and_why_separable_needs_at_most_one_odd_axis():
    assert LowPass.gaussian((16, 5, 8)).method == "separable"
    assert LowPass.gaussian((17, 5, 8)).method == "rfft"  # two odd axes
    assert LowPass.gaussian((17, 5, 9), grid="centered").method == "separable"  # centred grid: always even
    assert LowPass.gaussian((8, 4, 4), d_s=0).method == "zero"
    g = torch.Generator().manual_seed(5)
    glob, loc = torch.randn(1, 2, 17, 5, 9, generator=g), torch.randn(1, 2, 17, 5, 9, generator=g)
    ref = freq_mix_3d_reference(glob, loc, gaussian_low_pass_filter([17, 5, 9]))
    forced = spectral_blend(glob, loc, (0.25, 0.25), method="separable")
    assert (forced - ref).abs().max().item() > 1e-3  # not exact with three odd axes: auto must not pick it


def test_spectral_blend_low_precision_and_zero_filter():
    g = torch.Generator().manual_seed(6)
    glob, loc = torch.randn(1, 3, 16, 4, 8, generator=g), torch.randn(1, 3, 16, 4, 8, generator=g)
    ref = freq_mix_3d_reference(glob, loc, gaussian_low_pass_filter([16, 4, 8]))
    out = spectral_blend(glob.bfloat16(), loc.bfloat16(), (0.25, 0.25))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 0.05
    assert torch.equal(spectral_blend(glob, loc, (0.0, 0.25)), loc)
    assert torch.equal(spectral_blend(glob, loc, torch.zeros(16, 4, 8)), loc)


# ---------------------------------------------------------------------------------- the attention op
def _to_bcfhw(x, layout):
    """(N, heads, S, D) -> (B, heads*D, F, H, W)."""
    b, f, h, w = layout.batch, layout.frames, layout.height, layout.width
    heads, d = x.shape[1], x.shape[3]
    if layout.kind == "temporal":
        x6 = x.reshape(b, h, w, heads, f, d).permute(0, 3, 5, 4, 1, 2)
    else:
        x6 = x.reshape(b, heads, f, h, w, d).permute(0, 1, 5, 2, 3, 4)
    return x6.reshape(b, heads * d, f, h, w)


def _from_bcfhw(y, layout, heads):
    b, c, f, h, w = y.shape
    d = c // heads
    y6 = y.reshape(b, heads, d, f, h, w)
    if layout.kind == "temporal":
        return y6.permute(0, 4, 5, 1, 3, 2).reshape(b * h * w, heads, f, d)
    return y6.permute(0, 1, 3, 4, 5, 2).reshape(b, heads, f * h * w, d)


def _official_dense(q, k, v, layout, window, mode="adjusted", d_s=0.25, d_t=0.25, grid="official"):
    """Float64 re-statement of the official algorithm: dense global attention, dense band-masked local
    attention, freq_mix_3d on (B, C, F, H, W)."""
    q, k, v = q.double(), k.double(), v.double()
    f, tpf = layout.frames, layout.tokens_per_frame
    lo, hi = window_bounds(f, window, mode)
    frame = torch.arange(q.shape[2]) // tpf
    band = (frame[None] >= lo[frame][:, None]) & (frame[None] < hi[frame][:, None])  # (S, S)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    glob = scores.softmax(-1) @ v
    loc = scores.masked_fill(~band, float("-inf")).softmax(-1) @ v
    p = gaussian_low_pass_filter([f, layout.height, layout.width], d_s, d_t, grid, dtype=torch.float64)
    y = freq_mix_3d_reference(_to_bcfhw(glob, layout), _to_bcfhw(loc, layout), p)
    return _from_bcfhw(y, layout, q.shape[1])


def _qkv(layout, heads=4, d=8, seed=0, strided=True):
    n = layout.batch * layout.height * layout.width if layout.kind == "temporal" else layout.batch
    s = layout.frames * layout.tokens_per_frame
    g = torch.Generator().manual_seed(seed)
    if strided:  # (N, S, heads, D) memory, as OpAttnProcessor hands it over
        return tuple(torch.randn(n, s, heads, d, generator=g).transpose(1, 2) for _ in range(3))
    return tuple(torch.randn(n, heads, s, d, generator=g) for _ in range(3))


@pytest.mark.parametrize(
    "layout,kw",
    [
        (TokenLayout("temporal", 2, 40, 3, 4), {}),
        (TokenLayout("temporal", 1, 37, 4, 5), {"window_mode": "strict", "head_chunk": 1}),
        (TokenLayout("temporal", 2, 24, 2, 3), {"grid": "centered", "d_s": 0.5, "head_chunk": 4}),
        (TokenLayout("full", 1, 20, 3, 4), {}),
        (TokenLayout("full", 1, 20, 4, 4), {"chunk_bytes": 1}),  # default grouping, one head per group
        (TokenLayout("full", 2, 19, 3, 5), {"window_mode": "strict", "head_chunk": 3}),
    ],
)
def test_op_matches_official_dense_float64(layout, kw):
    q, k, v = _qkv(layout, strided=layout.batch == 2)
    op = SpectralBlendAttention(window=8, **kw)
    out = op(q, k, v, layout)
    ref = _official_dense(
        q, k, v, layout, 8, kw.get("window_mode", "adjusted"), kw.get("d_s", 0.25), 0.25, kw.get("grid", "official")
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - ref).abs().max().item() <= 1e-5
    # a second call reuses the cached geometry and gives the same result
    assert torch.equal(op(q, k, v, layout), out)
    # the blend is not a no-op here: the result differs from both branches
    glob = F.scaled_dot_product_attention(q, k, v)
    assert (out - glob).abs().max().item() > 1e-3


def test_op_short_clip_adjusted_is_vanilla():
    layout = TokenLayout("temporal", 2, 16, 3, 4)
    q, k, v = _qkv(layout)
    out = SpectralBlendAttention(window=16)(q, k, v, layout)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    strict = SpectralBlendAttention(window=16, window_mode="strict")(q, k, v, layout)
    assert (strict - out).abs().max().item() > 1e-4  # strict band at F=16 is not vanilla


def _count_full_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(q, k, v, *a, **kw):
        calls.append(k.shape[2])
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("kw", [{"d_s": 0.0, "d_t": 0.0}, {"local_only": True}, {"d_t": 0.0}])
def test_op_local_only_and_zero_filter_are_pure_local(kw, monkeypatch):
    layout = TokenLayout("temporal", 2, 40, 3, 4)
    q, k, v = _qkv(layout)
    lo, hi = window_bounds(40, 8)
    want = windowed_attention(q, k, v, lo, hi)
    calls = _count_full_sdpa(monkeypatch)
    out = SpectralBlendAttention(window=8, **kw)(q, k, v, layout)
    assert torch.equal(out, want)
    assert calls and 40 not in calls  # the discarded global branch is never computed
    ref = _official_dense(q, k, v, layout, 8, d_s=0.0, d_t=0.0)
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_op_blend_computes_global_once_per_head_group(monkeypatch):
    layout = TokenLayout("full", 1, 40, 2, 2)
    q, k, v = _qkv(layout, heads=4)
    calls = _count_full_sdpa(monkeypatch)
    SpectralBlendAttention(window=8, head_chunk=2)(q, k, v, layout)
    assert calls.count(40 * 4) == 2 and len(calls) > 2  # one global call per group, the rest local blocks


def test_op_half_precision_and_layout_errors():
    layout = TokenLayout("temporal", 1, 24, 2, 4)
    q, k, v = _qkv(layout)
    op = SpectralBlendAttention(window=8)
    ref = op(q, k, v, layout)
    out = op(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max().item() < 0.05
    with pytest.raises(ValueError):
        op(q, k, v, TokenLayout("temporal", 2, 24, 2, 4))
    with pytest.raises(ValueError):
        op(q, k, v, TokenLayout("spatial", 1, 24, 2, 4))
    with pytest.raises(ValueError):
        SpectralBlendAttention(window=8, grid="shifted")
