"""FreeLong's SpectralBlend: the 3D Gaussian low-pass filter, the blend, and the FreeLong attention op.

FreeLong (notes/freelong-freenoise.md section 1.2) runs temporal attention twice, globally (all frames) and
locally (a window of the model's native length), and keeps the low spatio-temporal frequencies of the
global output and everything else from the local one:

    Y = Re IFFTN( ifftshift( P * fftshift(FFTN(G)) + (1 - P) * fftshift(FFTN(L)) ) )     over (F, H, W)

with P the Gaussian of :func:`gaussian_low_pass_filter`. :func:`freq_mix_3d_reference` states exactly that.
The fast form used here is ``Y = L + lowpass(G - L)`` with a single real transform of the difference:

* ``separable``: the Gaussian is a product of three 1-D filters, so the low-pass is three real circulant
  matrices (F x F, H x H, W x W) applied along their axes (three GEMMs, no complex numbers). Exact when at
  most one of F, H, W is odd (the official grid makes the 1-D filter of an odd size asymmetric; ``.real``
  keeps its even part, which is again a real circulant, but with two such axes the even part of the product
  is no longer separable).
* ``rfft``: ``irfftn(rfftn(G - L) * P_even)`` with the unshifted filter symmetrised once,
  ``P_even(k) = (P(k) + P(-k)) / 2`` (exactly what ``.real`` keeps), over a half spectrum. Exact always.

Both compute in float32 whatever the input dtype (performance.md section 3.3).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from longvid.core.attention import WindowMode, window_bounds, windowed_attention
from longvid.core.context import TokenLayout

Grid = Literal["official", "centered"]
Method = Literal["auto", "separable", "rfft"]


# ----------------------------------------------------------------------------------------------- filter
def _axis_grid(n: int, grid: Grid) -> torch.Tensor:
    """Normalised frequency of each fftshifted bin, float64. ``official``: ``2i/n - 1`` (centred on index n/2,
    which is the DC bin only for even n). ``centered``: ``2(i - n//2)/n`` (DC exactly 0 for every n)."""
    i = torch.arange(n, dtype=torch.float64)
    if grid == "official":
        return 2 * i / n - 1
    if grid == "centered":
        return 2 * (i - n // 2) / n
    raise ValueError(f"grid must be 'official' or 'centered', got {grid!r}")


def _gaussian_factors(shape: Sequence[int], d_s: float, d_t: float, grid: Grid) -> list[torch.Tensor]:
    """The three 1-D float64 factors (t, h, w) of the fftshifted Gaussian filter; their outer product is P."""
    f, h, w = shape
    return [torch.exp(-0.5 * (_axis_grid(n, grid) / d) ** 2) for n, d in ((f, d_t), (h, d_s), (w, d_s))]


def gaussian_low_pass_filter(
    shape: Sequence[int],
    d_s: float = 0.25,
    d_t: float = 0.25,
    grid: Grid = "official",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """FreeLong's 3D Gaussian low-pass filter on the fftshifted (F, H, W) grid.

    ``P = exp(-1/2 [((2t/F-1)/d_t)^2 + ((2h/H-1)/d_s)^2 + ((2w/W-1)/d_s)^2])`` (``grid="official"``, including
    the odd-size quirk: for odd H the peak is below 1, e.g. 0.7261491 for (128, 5, 8)). ``grid="centered"``
    puts the DC bin exactly at the centre for odd sizes too (a documented deviation from the official code).
    ``d_s == 0`` or ``d_t == 0`` gives all zeros (everything from the local branch). Computed in float64.
    """
    f, h, w = (int(n) for n in shape)
    if d_s == 0 or d_t == 0:
        return torch.zeros(f, h, w, device=device, dtype=dtype)
    pt, ph, pw = _gaussian_factors((f, h, w), d_s, d_t, grid)
    p = pt[:, None, None] * ph[None, :, None] * pw[None, None, :]  # (F, H, W)
    return p.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ reference
def freq_mix_3d_reference(global_feat: torch.Tensor, local_feat: torch.Tensor, lpf: torch.Tensor) -> torch.Tensor:
    """The official blend restated plainly: three complex FFTs, shifts and a ``.repeat``-ed filter.

    ``global_feat``/``local_feat``: ``(B, C, F, H, W)``; ``lpf``: ``(F, H, W)`` fftshifted. Computes in float32
    (float64 for float64 inputs) and returns the input dtype. For tests and the benchmark's "official way".
    """
    dtype = global_feat.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    dims = (-3, -2, -1)
    g = torch.fft.fftshift(torch.fft.fftn(global_feat.to(compute), dim=dims), dim=dims)
    l = torch.fft.fftshift(torch.fft.fftn(local_feat.to(compute), dim=dims), dim=dims)
    b, c = global_feat.shape[:2]
    p = lpf.to(device=global_feat.device, dtype=compute).repeat(b, c, 1, 1, 1)  # (B, C, F, H, W), as upstream
    mixed = torch.fft.ifftshift(g * p + l * (1 - p), dim=dims)
    return torch.fft.ifftn(mixed, dim=dims).real.to(dtype)


# ------------------------------------------------------------------------------------------- low-pass
def _circulant(p_shifted: torch.Tensor) -> torch.Tensor:
    """Real (n, n) matrix M with ``M @ x == Re IFFT(ifftshift(p) * FFT(x))`` along one axis (float64)."""
    n = p_shifted.numel()
    p = torch.fft.ifftshift(p_shifted)  # (n,) unshifted: index 0 is DC
    return torch.fft.ifft(p[:, None] * torch.fft.fft(torch.eye(n, dtype=torch.float64), dim=0), dim=0).real


def _even_part(p_shifted: torch.Tensor) -> torch.Tensor:
    """Unshifted, even-symmetrised filter ``(P(k) + P(-k)) / 2`` over all axes (what ``.real`` keeps)."""
    p = torch.fft.ifftshift(p_shifted.double())
    dims = tuple(range(p.ndim))
    return 0.5 * (p + torch.roll(torch.flip(p, dims), shifts=(1,) * p.ndim, dims=dims))


class LowPass:
    """``x -> Re IFFTN(ifftshift(P) * FFTN(x))`` over three axes of a float32 tensor, precomputed for one (F, H, W).

    Build with :meth:`gaussian` (picks ``separable`` when exact, else ``rfft``) or :meth:`from_filter` (any
    fftshifted filter; ``rfft``). :meth:`apply` takes the (F, H, W) axis positions of its input.
    """

    def __init__(self, shape, method: str, mats=None, even=None, device=None):
        self.shape = tuple(shape)
        self.method = method  # "zero" | "separable" | "rfft"
        self.mats = mats  # separable: [(F,F), (H,H), (W,W)] float32
        self.even = even  # rfft: (F, H, W) float64 unshifted even filter (on CPU until first use)
        self.device = device
        self._half: dict[tuple, torch.Tensor] = {}

    @classmethod
    def gaussian(cls, shape, d_s=0.25, d_t=0.25, grid: Grid = "official", method: Method = "auto", device=None):
        shape = tuple(int(n) for n in shape)
        if d_s == 0 or d_t == 0:
            return cls(shape, "zero", device=device)
        factors = _gaussian_factors(shape, d_s, d_t, grid)
        asymmetric = sum(n % 2 == 1 for n in shape) if grid == "official" else 0
        if method == "auto":
            method = "separable" if asymmetric <= 1 else "rfft"
        if method == "separable":
            mats = [_circulant(p).to(device=device, dtype=torch.float32) for p in factors]
            return cls(shape, "separable", mats=mats, device=device)
        if method != "rfft":
            raise ValueError(f"method must be 'auto', 'separable' or 'rfft', got {method!r}")
        p = factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]
        return cls(shape, "rfft", even=_even_part(p), device=device)

    @classmethod
    def from_filter(cls, lpf: torch.Tensor):
        if not bool(lpf.any()):
            return cls(lpf.shape, "zero", device=lpf.device)
        return cls(lpf.shape, "rfft", even=_even_part(lpf.cpu()), device=lpf.device)

    @torch.no_grad()  # inference only: the out= products below have no autograd, and no caller needs gradients
    def apply(self, x: torch.Tensor, dims: Sequence[int], scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Low-pass of the float32 tensor ``x`` over axes ``dims = (f_axis, h_axis, w_axis)``.

        ``separable`` needs ``x`` contiguous and overwrites it (and ``scratch``, a tensor like ``x``); the
        result is one of the two. ``rfft`` leaves ``x`` alone and returns a new tensor.
        """
        if self.method == "zero":
            return torch.zeros_like(x)
        if self.method == "separable":
            y = torch.empty_like(x) if scratch is None else scratch
            for m, dim in zip(self.mats, dims):  # ping-pong x -> y -> x -> y
                _apply_along(x, m, dim, out=y)
                x, y = y, x
            return x
        order = sorted(range(3), key=lambda a: dims[a])  # filter axes in tensor order
        sorted_dims = [dims[a] for a in order]
        key = (x.ndim, tuple(dims), str(x.device))
        if key not in self._half:
            even = self.even.permute(order)  # axes in tensor order
            half = even[..., : even.shape[-1] // 2 + 1]  # rfft halves the last transformed axis
            view = [1] * x.ndim
            for a, dim in enumerate(sorted_dims):
                view[dim] = half.shape[a]
            self._half[key] = half.reshape(view).to(device=x.device, dtype=torch.float32)
        spec = torch.fft.rfftn(x, dim=sorted_dims)
        spec.mul_(self._half[key])
        return torch.fft.irfftn(spec, s=[x.shape[d] for d in sorted_dims], dim=sorted_dims)


def _apply_along(x: torch.Tensor, m: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """``out = m @ x`` along axis ``dim`` (x, out contiguous, same shape; m (n, n))."""
    n = x.shape[dim]
    pre, post = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1 :])
    if post == 1:
        torch.mm(x.view(pre, n), m.T, out=out.view(pre, n))
    elif pre == 1:
        torch.mm(m, x.view(n, post), out=out.view(n, post))
    else:
        torch.matmul(m, x.view(pre, n, post), out=out.view(pre, n, post))


@lru_cache(maxsize=16)
def _cached_gaussian(shape, d_s, d_t, grid, method, device) -> LowPass:
    return LowPass.gaussian(shape, d_s, d_t, grid, method, torch.device(device))


@torch.no_grad()
def spectral_blend(
    global_feat: torch.Tensor,
    local_feat: torch.Tensor,
    lpf: torch.Tensor | tuple[float, float],
    grid: Grid = "official",
    channel_chunk: int | None = None,
    method: Method = "auto",
) -> torch.Tensor:
    """FreeLong's blend of ``(B, C, F, H, W)`` features, equal to :func:`freq_mix_3d_reference`.

    ``lpf``: a fftshifted ``(F, H, W)`` filter (any; ``rfft`` path), or ``(d_s, d_t)`` for the Gaussian on
    ``grid`` (``separable`` when exact, else ``rfft``; cached per geometry). Computes ``L + lowpass(G - L)`` in
    float32, ``channel_chunk`` channels at a time (default: about 32 Mi elements per chunk); returns
    ``local_feat``'s dtype.
    """
    b, c, f, h, w = local_feat.shape
    if isinstance(lpf, torch.Tensor):
        op = LowPass.from_filter(lpf)
    else:
        d_s, d_t = lpf
        op = _cached_gaussian((f, h, w), float(d_s), float(d_t), grid, method, str(local_feat.device))
    if op.method == "zero":
        return local_feat.clone()
    cc = channel_chunk or max(1, (32 << 20) // (b * f * h * w))
    out = torch.empty_like(local_feat)
    for c0 in range(0, c, cc):
        g, l = global_feat[:, c0 : c0 + cc], local_feat[:, c0 : c0 + cc]  # (B, cc, F, H, W)
        diff = torch.empty(g.shape, device=g.device, dtype=torch.float32)
        torch.sub(g.float(), l.float(), out=diff)
        low = op.apply(diff, dims=(2, 3, 4))
        torch.add(l.float(), low, out=low)
        out[:, c0 : c0 + cc] = low
    return out


# -------------------------------------------------------------------------------------- attention op
class SpectralBlendAttention:
    """FreeLong's SpectralBlend attention as a longvid attention op ``(q, k, v, layout) -> out``.

    Global branch: full SDPA over every token. Local branch: :func:`windowed_attention` over frame windows of
    ``window`` frames (the model's native length; ``window_mode`` as in :func:`window_bounds`). The outputs are
    blended per :func:`spectral_blend` in the (B, C = heads*D, F, H, W) layout given by ``layout`` (``temporal``:
    q is ``(B*H*W, heads, F, D)``, leading axis (b, h, w); ``full``: q is ``(B, heads, F*H*W, D)``, (f, h, w)
    raster), before the output projection (exact: the blend is linear per channel and keeps constants).

    ``local_only=True`` returns the local branch alone (the official full-resolution UNet level); a zero filter
    (``d_s`` or ``d_t`` = 0) does too, and ``F <= window`` with the adjusted window returns plain SDPA: no
    discarded branch is ever computed. Heads are processed in groups (q/k/v of a head group -> both branches ->
    blend, in place in the preallocated output): ``head_chunk`` heads, or by default as many as keep one
    group's float32 output under ``chunk_bytes`` (256 MiB), so the working set beyond the output is about two
    such groups (the global branch and one scratch buffer), and small layers run in one group.
    """

    def __init__(
        self,
        *,
        window: int,
        window_mode: WindowMode = "adjusted",
        d_s: float = 0.25,
        d_t: float = 0.25,
        grid: Grid = "official",
        local_only: bool = False,
        head_chunk: int | None = None,
        chunk_bytes: int = 256 << 20,
        block_frames: int | None = None,
    ):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        window_bounds(1, window, window_mode)  # validates the mode
        _axis_grid(1, grid)  # validates the grid
        self.window, self.window_mode = int(window), window_mode
        self.d_s, self.d_t, self.grid = float(d_s), float(d_t), grid
        self.local_only = bool(local_only)
        self.head_chunk, self.chunk_bytes, self.block_frames = head_chunk, int(chunk_bytes), block_frames
        self._cache: dict[tuple, object] = {}  # per-geometry window bounds and low-pass operators

    def _bounds(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("bounds", frames)  # on the host: windowed_attention plans its blocks there
        if key not in self._cache:
            self._cache[key] = window_bounds(frames, self.window, self.window_mode)
        return self._cache[key]

    def _lowpass(self, shape, device) -> LowPass:
        key = ("lowpass", tuple(shape), str(device))
        if key not in self._cache:
            self._cache[key] = LowPass.gaussian(shape, self.d_s, self.d_t, self.grid, device=device)
        return self._cache[key]

    @torch.no_grad()  # an inference op: works in plain mode, no_grad and inference_mode alike
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        n, heads, seq, _ = q.shape  # (N, heads, S, D)
        b, f, h, w = layout.batch, layout.frames, layout.height, layout.width
        if layout.kind == "temporal":
            ok = n == b * h * w and seq == f
        elif layout.kind == "full":
            ok = n == b and seq == f * h * w
        else:
            raise ValueError(f"SpectralBlendAttention needs a temporal or full site, got {layout.kind!r}")
        if not ok:
            raise ValueError(f"q {tuple(q.shape)} does not match the {layout.kind} layout {layout}")
        tpf = layout.tokens_per_frame
        lo, hi = self._bounds(f)
        if int(lo.max()) == 0 and int(hi.min()) == f:  # every window is the whole clip (adjusted, F <= window)
            return F.scaled_dot_product_attention(q, k, v)  # local == global: exactly vanilla
        lowpass = None if self.local_only else self._lowpass((f, h, w), q.device)
        if lowpass is None or lowpass.method == "zero":
            return windowed_attention(q, k, v, lo, hi, tpf, self.block_frames)

        hg = self.head_chunk or max(1, (self.chunk_bytes // (4 * n * seq * v.shape[-1])))
        hg = max(d for d in range(1, min(hg, heads) + 1) if heads % d == 0)  # a divisor: equal chunks
        c = hg * v.shape[-1]  # channels of one head group
        # Blend layout = SDPA's output memory (N, S, hg, D) viewed as 5-D with channels last, no copies:
        if layout.kind == "temporal":
            shape5, dims = (b, h, w, f, c), (3, 1, 2)  # (B, H, W, F, C') ; (f, h, w) axes
        else:
            shape5, dims = (b, f, h, w, c), (1, 2, 3)  # (B, F, H, W, C')
        out = q.new_empty(n, seq, heads, v.shape[-1]).transpose(1, 2)  # (N, heads, S, D), SDPA's layout
        scratch = None
        for h0 in range(0, heads, hg):
            sl = slice(h0, h0 + hg)
            qg, kg, vg = q[:, sl], k[:, sl], v[:, sl]  # (N, hg, S, D)
            # local branch straight into the output, then out += lowpass(global - local) in place
            windowed_attention(qg, kg, vg, lo, hi, tpf, self.block_frames, out=out[:, sl])
            loc = out[:, sl].transpose(1, 2).view(shape5)
            glob = F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2).reshape(shape5)
            if glob.dtype == torch.float32 and glob.is_contiguous():
                diff = glob.sub_(loc)  # G - L in place
            else:
                diff = torch.sub(glob.float(), loc.float()).contiguous()
            del glob
            if scratch is None and lowpass.method == "separable":
                scratch = torch.empty_like(diff)  # reused by every head group
            loc.add_(lowpass.apply(diff, dims, scratch))  # float32 low-pass, cast on store
            del diff
        return out
