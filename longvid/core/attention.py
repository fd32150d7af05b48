"""Attention kernels: exact frame-windowed attention without a dense mask.

A *frame window* gives every query frame ``f`` a contiguous key-frame range ``[lo[f], hi[f])``. Tokens are
frames-major: a sequence of ``S = frames * tokens_per_frame`` tokens, where the ``tokens_per_frame`` tokens of
one frame are consecutive (``1`` for UNet temporal attention, ``H*W`` for a DiT's (f, h, w) raster order).

:func:`windowed_attention` is blocked SDPA: it cuts the queries into blocks of frames, and each block attends
only to the slab of keys its frames can see (a slice, no copy), with an exact boolean mask inside the slab
only when the block's rows differ. Work is O(S * (block + window)), memory O(output); no S x S mask is ever
built. Block sizes follow notes/performance.md section 3.2 (32 query frames for temporal attention).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

WindowMode = Literal["adjusted", "strict"]


def window_bounds(
    num_frames: int, window: int, mode: WindowMode = "adjusted", device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-frame range ``[lo[i], hi[i])`` of every query frame ``i`` for a local window of ``window`` frames.

    ``strict`` (VideoCrafter2): the band ``|i - j| <= window // 2``, cut at the ends (window 16: 9 frames wide
    at the ends, 17 in the interior). ``adjusted`` (LaVie): the same band, but a band cut by either end is
    widened to ``window`` frames (window 16: row 0 sees frames 0..15, the interior 17). With ``adjusted`` and
    ``num_frames <= window`` every row sees every frame, so local attention equals full attention.

    Returns two ``(num_frames,)`` int64 tensors.
    """
    if mode not in ("adjusted", "strict"):
        raise ValueError(f"window mode must be 'adjusted' or 'strict', got {mode!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    half = window // 2
    i = torch.arange(num_frames, device=device)
    lo = (i - half).clamp(min=0)
    hi = (i + half + 1).clamp(max=num_frames)
    if mode == "adjusted":
        width = min(window, num_frames)
        hi = torch.where(lo == 0, hi.clamp(min=width), hi)  # cut at the start: widen to the right
        lo = torch.where(hi == num_frames, lo.clamp(max=num_frames - width), lo)  # cut at the end: widen left
    return lo, hi


def default_block_frames(tokens_per_frame: int) -> int:
    """Query frames per block: 32 for temporal attention (performance.md 3.2, fastest on CPU); for DiTs about
    64 query tokens per block, and a single frame (a slab that needs no mask at all) from 64 tokens per frame."""
    return max(1, min(32, math.ceil(64 / tokens_per_frame)))


@lru_cache(maxsize=32)
def _block_plan(lo: tuple, hi: tuple, t: int, bf: int, device: str) -> tuple:
    """Query blocks of ``bf`` frames: ``(q0, q1, k0, k1, mask)`` in tokens; ``mask`` is the exact boolean
    ``(q1-q0, k1-k0)`` mask inside the key slab, or None when every row of the block sees the whole slab."""
    plan = []
    for f0 in range(0, len(lo), bf):
        f1 = min(f0 + bf, len(lo))
        rows_lo, rows_hi = lo[f0:f1], hi[f0:f1]
        k0, k1 = min(rows_lo), max(rows_hi)  # the key slab this block needs
        mask = None
        if any(a != k0 for a in rows_lo) or any(b != k1 for b in rows_hi):
            j = torch.arange(k0, k1)  # (slab,)
            mask = (j >= torch.tensor(rows_lo)[:, None]) & (j < torch.tensor(rows_hi)[:, None])  # (bf, slab) frames
            if t > 1:
                mask = mask[:, None, :, None].expand(f1 - f0, t, k1 - k0, t).reshape((f1 - f0) * t, (k1 - k0) * t)
            mask = mask.to(device)
        plan.append((f0 * t, f1 * t, k0 * t, k1 * t, mask))
    return tuple(plan)


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    tokens_per_frame: int = 1,
    block_frames: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention where a query of frame ``f`` sees only the keys of frames ``[lo[f], hi[f])``.

    q/k/v: ``(N, heads, S, D)`` with ``S = frames * tokens_per_frame``, frames-major. Returns ``(N, heads, S, Dv)``,
    written into ``out`` when given (any strides). Falls back to one plain SDPA call when every row sees every
    frame.
    """
    n, heads, seq, _ = q.shape  # (N, heads, S, D)
    t = tokens_per_frame
    frames = seq // t
    if frames * t != seq or lo.numel() != frames or hi.numel() != frames:
        raise ValueError(f"S={seq} is not frames({lo.numel()}) x tokens_per_frame({t})")
    lo_l, hi_l = tuple(lo.tolist()), tuple(hi.tolist())  # host copies: the block loop runs on the host
    if max(lo_l) == 0 and min(hi_l) == frames:
        full = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return full if out is None else out.copy_(full)
    if out is None:
        out = q.new_empty(n, seq, heads, v.shape[-1]).transpose(1, 2)  # (N, heads, S, Dv), SDPA's own layout
    plan = _block_plan(lo_l, hi_l, t, block_frames or default_block_frames(t), str(q.device))
    for q0, q1, k0, k1, mask in plan:  # token ranges of a query block and of the key slab it needs
        out[:, :, q0:q1] = F.scaled_dot_product_attention(
            q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], attn_mask=mask, scale=scale
        )  # (N, heads, q1-q0, Dv)
    return out


def dense_window_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    tokens_per_frame: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """Float64 dense-mask reference of :func:`windowed_attention` (tests only; builds the S x S mask).

    Returns a float64 ``(N, heads, S, Dv)`` tensor.
    """
    q, k, v = q.double(), k.double(), v.double()
    frame = torch.arange(q.shape[2], device=q.device) // tokens_per_frame  # (S,) frame of each token
    key_frame = frame[None, :]  # (1, S)
    mask = (key_frame >= lo.to(q.device)[frame][:, None]) & (key_frame < hi.to(q.device)[frame][:, None])  # (S, S)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (N, heads, S, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v
