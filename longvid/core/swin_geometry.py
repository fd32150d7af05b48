"""FreeSwim's inward sliding window, as pure functions of the token grid (notes §2.2, §2.6).

Every query token at row ``r``, column ``c`` of a frame sees, in *every* latent frame, the key rows
``[lo_h[r], hi_h[r])`` and columns ``[lo_w[c], hi_w[c])``. With ``inward`` windows (FreeSwim) a window cut by the
canvas border is shifted inside instead: ``start = clamp(q − half, 0, size − (2·half + 1))``, so every query sees
exactly ``(2·half_h + 1)(2·half_w + 1)`` keys per frame, the trained spatial extent. Without ``inward`` (the
paper's ablation) the window is truncated at the border. The half sizes come from the model's native
resolution: a 480×832 base on Wan (16 px per token) gives halves (15, 26), a 31×53-token window.

Everything here is integer arithmetic on the grid, shared by the attention kernels, the benchmark and pictures
of what the method does.
"""

from __future__ import annotations

import math

import torch


def window_half(base_tokens: tuple[int, int]) -> tuple[int, int]:
    """Half sizes ``(d_h, d_w)`` of the window from the base resolution in tokens: ``base // 2`` per axis (the
    official ``base_h / 16 / 2``, floored: 30×52 tokens -> (15, 26); 45×80 -> (22, 40))."""
    return base_tokens[0] // 2, base_tokens[1] // 2


def axis_bounds(size: int, half: int, inward: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Key range ``[lo[q], hi[q])`` of every query index ``q`` on one axis of ``size`` tokens; two ``(size,)``
    int64 tensors. A window at least the canvas covers the whole axis."""
    q = torch.arange(size)
    if inward:
        width = min(2 * half + 1, size)
        lo = (q - half).clamp(0, size - width)
        return lo, lo + width
    return (q - half).clamp(min=0), (q + half + 1).clamp(max=size)


def window_member(q_tok: torch.Tensor, k_tok: torch.Tensor, grid: tuple[int, int, int], half: tuple[int, int],
                  inward: bool = True) -> torch.Tensor:
    """Whether raster token ``q_tok`` attends to raster token ``k_tok`` (broadcasting int64 tensors of tokens in
    (f, h, w) order). No temporal restriction: only the spatial window decides. The predicate of the flex mask
    and of the dense test reference."""
    _, h, w = grid
    qr, qc = q_tok // w % h, q_tok % w
    kr, kc = k_tok // w % h, k_tok % w
    if inward:
        sh = (qr - half[0]).clamp(0, max(h - (2 * half[0] + 1), 0))
        sw = (qc - half[1]).clamp(0, max(w - (2 * half[1] + 1), 0))
        return (kr >= sh) & (kr <= sh + 2 * half[0]) & (kc >= sw) & (kc <= sw + 2 * half[1])
    return ((kr - qr).abs() <= half[0]) & ((kc - qc).abs() <= half[1])


def keys_per_query(grid: tuple[int, int, int], half: tuple[int, int], inward: bool = True) -> torch.Tensor:
    """Keys each query sees, ``(H, W)`` (constant with inward windows)."""
    f, h, w = grid
    lo_h, hi_h = axis_bounds(h, half[0], inward)
    lo_w, hi_w = axis_bounds(w, half[1], inward)
    return f * (hi_h - lo_h)[:, None] * (hi_w - lo_w)[None, :]


def element_density(grid: tuple[int, int, int], half: tuple[int, int], inward: bool = True) -> float:
    """Fraction of the ``S × S`` score matrix the window keeps."""
    f, h, w = grid
    return float(keys_per_query(grid, half, inward).sum()) * f / float(f * h * w) ** 2


def tile_order(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """A token permutation (``(S,)`` raster indices in the new order) that makes every ``tf × th × tw`` tile of
    the video contiguous (tiles in (f, h, w) order, tokens in raster order inside a tile; edge tiles are smaller).

    Windows span every frame, so what a flex block of 128 keys must cover is its *spatial* footprint: a tile of
    8 frames × 4 × 4 tokens has a 16-cell footprint where a raster block has a 128-cell strip, and the blocks
    a window touches approach the element density (notes §2.6)."""
    f, h, w = grid
    tf, th, tw = tile
    t = torch.arange(f)[:, None, None]
    r = torch.arange(h)[None, :, None]
    c = torch.arange(w)[None, None, :]
    n_r, n_c = -(-h // th), -(-w // tw)
    tile_id = ((t // tf) * n_r + r // th) * n_c + c // tw  # (F, H, W) which tile a token is in
    inside = ((t % tf) * th + r % th) * tw + c % tw  # its raster rank inside the tile
    key = (tile_id * (tf * th * tw) + inside).flatten()  # (S,) sort key
    return torch.argsort(key, stable=True)


def block_density(grid: tuple[int, int, int], half: tuple[int, int], block: int = 128, inward: bool = True,
                  order: torch.Tensor | None = None) -> float:
    """Fraction of ``block × block`` tiles of the score matrix with any kept entry (what a block-sparse kernel
    such as flex attention computes), for tokens in raster order or in ``order`` (from :func:`tile_order`).

    Exact: windows ignore frames, so a query block keeps a key block when the union of its queries' spatial
    windows contains any spatial cell of the key block. Query blocks with the same set of cells are counted once
    (a raster order repeats every few frames)."""
    f, h, w = grid
    seq = f * h * w
    tokens = torch.arange(seq) if order is None else order
    n_blocks = -(-seq // block)
    pad = n_blocks * block - seq
    cells = torch.cat([tokens % (h * w), tokens.new_full((pad,), h * w)]).view(n_blocks, block)  # H*W = padding
    lo_h, hi_h = axis_bounds(h, half[0], inward)
    lo_w, hi_w = axis_bounds(w, half[1], inward)
    patterns: dict[bytes, int] = {}
    for row in cells.sort(1).values:  # a query block's pattern: its sorted cells
        key = row.unique().numpy().tobytes()
        patterns[key] = patterns.get(key, 0) + 1
    flat_keys = cells.flatten()  # (n_blocks*block,) each key slot's cell
    kept = 0
    for key, count in patterns.items():
        q = torch.frombuffer(bytearray(key), dtype=torch.int64)
        q = q[q < h * w]
        r0, r1, c0, c1 = lo_h[q // w], hi_h[q // w], lo_w[q % w], hi_w[q % w]  # (m,) window rectangles
        diff = torch.zeros(h + 1, w + 1)
        for rr, cc, sign in ((r0, c0, 1.0), (r0, c1, -1.0), (r1, c0, -1.0), (r1, c1, 1.0)):
            diff.index_put_((rr, cc), torch.full(rr.shape, sign), accumulate=True)
        seen = torch.cat([diff.cumsum(0).cumsum(1)[:h, :w].flatten() > 0, torch.zeros(1, dtype=torch.bool)])
        kept += count * int(seen[flat_keys].view(n_blocks, block).any(1).sum())
    return kept / n_blocks**2


def attention_scale(head_dim: int, rule: str, base_tokens: int, target_tokens: int) -> float:
    """Softmax scale of both branches' self-attention.

    ``official``: ``sqrt(log_1560(3120) / d)`` — FreeSwim's entropy factor with its hard-coded token ratio 2
    (1.0461× the default); ``tokens``: the same rule with the real ratio, ``sqrt(log(target) / log(base)) / √d``
    per frame; ``default``: ``1 / √d``."""
    if rule == "default":
        return head_dim**-0.5
    if rule == "official":
        return math.sqrt(math.log(3120) / math.log(1560) / head_dim)
    if rule == "tokens":
        return math.sqrt(math.log(max(target_tokens, 2)) / math.log(max(base_tokens, 2)) / head_dim)
    raise ValueError(f"scale rule must be 'official', 'tokens' or 'default', got {rule!r}")
