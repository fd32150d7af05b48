"""Inward sliding-window attention (FreeSwim's window branch), exactly, without a dense mask.

q/k/v are ``(N, heads, S, D)`` with tokens in Wan's (f, h, w) raster order; a query sees, in every frame, the
spatial window of :mod:`longvid.core.swin_geometry`. Two kernels compute the same function:

- ``tiled`` (any device, the CPU path): queries are cut into ``th × tw`` spatial tiles (all frames); a tile's
  keys are the union of its queries' windows, a ``(th + 2·d_h) × (tw + 2·d_w)`` slab of every frame, and the
  exact boolean mask inside the slab is the same for every interior tile, so a handful of masks are built once
  per geometry. Work is ``(th + 2d_h)(tw + 2d_w) / ((2d_h + 1)(2d_w + 1))`` of the exact entries (1.24× at
  1080p with 4×8 tiles), with SDPA inside each tile.
- ``flex`` (CUDA, compiled; eager on CPU for tests only, where it materialises the scores): ``flex_attention``
  with a block mask built once per geometry from the window predicate; ``order="tile"`` runs it in a tile-major token order (8 frames × 4 × 4 tokens per 128-token block)
  where the kept-block fraction is 0.25 instead of raster's 0.48 at 1080p (0.14 vs 0.34 at 4K).

:func:`swin_reference` is the dense float64 statement the tests compare both against.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from longvid.core.swin_geometry import axis_bounds, tile_order, window_member

Tensor = torch.Tensor
_COMPILED: dict = {}


def swin_attention(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int, int], half: tuple[int, int],
                   scale: float | None = None, inward: bool = True, backend: str = "auto",
                   tile: tuple[int, int] | None = None, order: str = "raster", mask_bytes: int = 16 << 20,
                   cache: dict | None = None) -> Tensor:
    """Window attention of ``q`` over ``k``/``v`` (N, heads, S, D) on the token ``grid`` (F, H, W) with window
    half sizes ``half``; returns (N, heads, S, Dv). ``backend``: ``tiled``, ``flex`` or ``auto`` (flex on CUDA).
    ``cache`` (a dict) keeps flex block masks between calls."""
    f, h, w = grid
    if q.shape[2] != f * h * w:
        raise ValueError(f"S={q.shape[2]} is not the grid {grid}")
    if covers_canvas(grid, half, inward):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "auto":
        backend = "flex" if q.is_cuda else "tiled"
    if backend == "tiled":
        return _tiled(q, k, v, grid, half, scale, inward, tile or default_tile(half), mask_bytes)
    if backend == "flex":
        return _flex(q, k, v, grid, half, scale, inward, order, {} if cache is None else cache)
    raise ValueError(f"backend must be 'auto', 'tiled' or 'flex', got {backend!r}")


def covers_canvas(grid: tuple[int, int, int], half: tuple[int, int], inward: bool = True) -> bool:
    """Whether every query's window is the whole frame (the window branch is then full attention)."""
    reach = (2 * half[0] + 1, 2 * half[1] + 1) if inward else (half[0] + 1, half[1] + 1)
    return reach[0] >= grid[1] and reach[1] >= grid[2]


def default_tile(half: tuple[int, int]) -> tuple[int, int]:
    """Query tile ``th × tw``: about a quarter of the window per side (7×13 for a 31×53 window): the key slab is
    1.46× the window while the matrix products stay large, the fastest trade measured on CPU."""
    return max(1, (2 * half[0] + 1) // 4), max(1, (2 * half[1] + 1) // 4)


@lru_cache(maxsize=256)
def _spatial_mask(rows: tuple, cols: tuple) -> Tensor:
    """The exact mask of one tile inside its key slab: ``rows``/``cols`` are each query row's / column's key range
    relative to the slab, ``((lo, hi), ...)``. Returns ``(th·tw, kh·kw)`` bool. Interior tiles share one."""
    kh = max(hi for _, hi in rows)
    kw = max(hi for _, hi in cols)
    a, b = torch.arange(kh), torch.arange(kw)
    row_ok = torch.stack([(a >= lo) & (a < hi) for lo, hi in rows])  # (th, kh)
    col_ok = torch.stack([(b >= lo) & (b < hi) for lo, hi in cols])  # (tw, kw)
    return (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(len(rows) * len(cols), kh * kw)


def _tiled(q, k, v, grid, half, scale, inward, tile, mask_bytes) -> Tensor:
    n, heads, _, dim = q.shape
    f, h, w = grid
    th, tw = min(tile[0], h), min(tile[1], w)
    lo_h, hi_h = (t.tolist() for t in axis_bounds(h, half[0], inward))
    lo_w, hi_w = (t.tolist() for t in axis_bounds(w, half[1], inward))
    q5, k5, v5 = (t.unflatten(2, (f, h, w)) for t in (q, k, v))  # (N, heads, F, H, W, D)
    out = q.new_empty(n, heads, f, h, w, v.shape[-1])
    for r0 in range(0, h, th):
        r1 = min(r0 + th, h)
        kr0, kr1 = lo_h[r0], max(hi_h[r0:r1])  # the key rows this tile's queries need
        rows = tuple((lo_h[r] - kr0, hi_h[r] - kr0) for r in range(r0, r1))
        for c0 in range(0, w, tw):
            c1 = min(c0 + tw, w)
            kc0, kc1 = lo_w[c0], max(hi_w[c0:c1])
            cols = tuple((lo_w[c] - kc0, hi_w[c] - kc0) for c in range(c0, c1))
            keys = (kr1 - kr0) * (kc1 - kc0)
            kt = k5[:, :, :, kr0:kr1, kc0:kc1].reshape(n, heads, f * keys, dim)  # (N, heads, F·kh·kw, D)
            vt = v5[:, :, :, kr0:kr1, kc0:kc1].reshape(n, heads, f * keys, -1)
            # query frames in chunks so a chunk's mask stays within mask_bytes (each chunk sees every frame)
            fq = max(1, min(f, mask_bytes // max(1, (r1 - r0) * (c1 - c0) * f * keys)))
            for f0 in range(0, f, fq):
                f1 = min(f0 + fq, f)
                qt = q5[:, :, f0:f1, r0:r1, c0:c1].reshape(n, heads, -1, dim)  # (N, heads, fq·th·tw, D)
                spatial = _spatial_mask(rows, cols)  # (th·tw, kh·kw): no frame restriction, so tiled over frames
                mask = spatial[None, :, None, :].expand(f1 - f0, -1, f, -1).reshape(-1, f * keys).to(q.device)
                o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
                out[:, :, f0:f1, r0:r1, c0:c1] = o.unflatten(2, (f1 - f0, r1 - r0, c1 - c0))
    return out.flatten(2, 4)


def _flex(q, k, v, grid, half, scale, inward, order, cache) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    f, h, w = grid
    seq = f * h * w
    key = (grid, half, inward, order, str(q.device))
    if key not in cache:
        perm = None
        if order == "tile":
            perm = tile_order(grid, (8, 4, 4)).to(q.device)
        elif order != "raster":
            raise ValueError(f"order must be 'raster' or 'tile', got {order!r}")

        def mask_mod(b, hh, q_idx, kv_idx):
            if perm is not None:
                q_idx, kv_idx = perm[q_idx], perm[kv_idx]
            return window_member(q_idx, kv_idx, grid, half, inward)

        # compiled on CUDA, the mask is built block by block; eager (CPU tests) it evaluates the dense S × S grid
        build = _COMPILED.setdefault("mask", torch.compile(create_block_mask)) if q.is_cuda else create_block_mask
        block_mask = build(mask_mod, None, None, seq, seq, device=q.device)
        inverse = torch.argsort(perm) if perm is not None else None
        cache[key] = (block_mask, perm, inverse)
    block_mask, perm, inverse = cache[key]
    kernel = flex_attention
    if q.is_cuda:  # eager flex materialises every score; compiled it is a fused kernel
        kernel = _COMPILED.setdefault("flex", torch.compile(flex_attention, dynamic=False))
    if perm is not None:
        q, k, v = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    out = kernel(q, k, v, block_mask=block_mask, scale=scale)
    return out[:, :, inverse] if inverse is not None else out


def swin_reference(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int, int], half: tuple[int, int],
                   scale: float | None = None, inward: bool = True) -> Tensor:
    """Dense float64 window attention (tests only: builds the S × S mask). Returns float64 (N, heads, S, Dv)."""
    q, k, v = q.double(), k.double(), v.double()
    tok = torch.arange(q.shape[2], device=q.device)
    mask = window_member(tok[:, None], tok[None, :], grid, half, inward)  # (S, S)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
