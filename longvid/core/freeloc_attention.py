"""FreeLOC's two attention treatments as branch lists for :func:`longvid.core.branch_attention.branch_attention`.

Membership and positions come straight from the pure geometry (``core/freeloc_geometry.py``, checked against the
notes' reference values; the membership predicates are elementwise, so ``flex_attention`` can trace them into
block masks); this module only adds, per branch, which keys a block of queries can have, so the CPU path scores
a band or a set of raster stripes instead of the whole sequence:

- VRPR: five contiguous token bands (diag, mid-past/future, far-past/future);
- TSA: the original-position branch split (exactly: disjoint parts of one softmax) into the dense band, the
  raster stripes of frame distances 8..24 and the first-frame column, plus the past and future sinks. The
  stripes are planned in their own query tiles (frames × in-frame positions, see ``stripe_tiles``) with the
  keys near those positions, not per block of consecutive tokens (which spans whole frames at small P).
"""

from __future__ import annotations

import torch

from longvid.core.branch_attention import Branch, band, branch_cost
from longvid.core.freeloc_geometry import (TSA_WINDOW_1, TSA_WINDOW_2, VrprSettings, round_up, sink_future_frame,
                                           stripe_width, tsa_member, tsa_positions, vrpr_member, vrpr_positions)

Tensor = torch.Tensor
TILE_QUERIES = 256  # TSA's largest stripe tile before the planner halves it (bounds each membership mask it builds)


def vrpr_branches(grid: tuple[int, int, int], settings: VrprSettings, round_to: int = 128,
                  gap_fix: bool = False) -> list[Branch]:
    f, h, w = grid
    p, seq = h * w, f * h * w
    w1tok, w2tok = round_up(p * settings.w1, round_to), round_up(p * settings.w2, round_to)
    diag = w1tok - 1 if gap_fix else (settings.w1 - 1) * p
    ranges = [(-diag, diag), (-w2tok + 1, -w1tok), (w1tok, w2tok - 1), (-seq, -w2tok), (w2tok, seq)]  # n − m

    def branch(b: int) -> Branch:
        return Branch(positions=lambda frames: vrpr_positions(frames, b, settings),
                      member=lambda m, n: vrpr_member(m, n, b, p, settings, round_to, gap_fix),
                      candidates=band(*ranges[b], seq))

    return [branch(b) for b in range(5)]


def tsa_branches(grid: tuple[int, int, int], round_to: int = 128, sink_future: str = "auto") -> list[Branch]:
    f, h, w = grid
    p, seq = h * w, f * h * w
    d1, d2 = round_up(TSA_WINDOW_1 * p, round_to), round_up(TSA_WINDOW_2 * p, round_to)
    first = round_up(p, round_to)
    last = round_up(sink_future_frame(f, sink_future) * p, round_to)
    width = stripe_width(p)

    def original(m, n):
        return tsa_member(m, n, 0, p, f, round_to, sink_future)

    def stripes(q0: int, q1: int) -> Tensor:
        """Keys at frame distances 8..24 (token distance (d1, d2]) near the block's in-frame positions."""
        inside = torch.arange(q0, q1) % p
        lo, hi = (0, p) if q1 - q0 >= p or inside[0] > inside[-1] else (max(0, int(inside[0]) - width + 1),
                                                                       min(p, int(inside[-1]) + width))
        frames = range(max(0, (q0 - d2) // p), min(f, (q1 - 1 + d2) // p + 1))
        if width <= 0 or hi <= lo or not frames:  # a stripe narrower than one token holds nothing
            return torch.arange(0)
        keys = torch.cat([torch.arange(j * p + lo, j * p + hi) for j in frames])
        delta = keys[None, :] - torch.arange(q0, q1)[:, None]
        near = ((delta.abs() > d1) & (delta.abs() <= d2)).any(0)
        return keys[near]

    def stripe_member(m, n):
        return original(m, n) & ((m - n).abs() > d1) & (n >= first)

    def stripe_tile(i0: int, tile_f: int, r0: int, tile_p: int) -> tuple[Tensor, Tensor]:
        """Queries of frames [i0, i0 + tile_f) × positions [r0, r0 + tile_p) (clipped; (frames, positions)) and
        the keys their stripes can hold: the frames at token distance (d1, d2] of some query, the positions
        within the stripe width of the tile's."""
        frames = torch.arange(i0, min(i0 + tile_f, f))
        inside = torch.arange(r0, min(r0 + tile_p, p))
        queries = frames[:, None] * p + inside[None, :]  # (frames, positions)
        lo, hi = int(queries.min()), int(queries.max())
        near = torch.zeros(f, dtype=torch.bool)  # key frames at token distance (d1, d2] of some query
        for a, b in ((lo - d2, hi - d1 - 1), (lo + d1 + 1, hi + d2)):
            a, b = max(0, a), min(seq - 1, b)
            if a <= b:
                near[a // p:b // p + 1] = True
        cols = torch.arange(max(0, r0 - width + 1), min(p, int(inside[-1]) + width))
        keys = (near.nonzero().flatten()[:, None] * p + cols[None, :]).flatten()
        return queries, keys[keys >= first]

    def tile_shape() -> tuple[int, int]:
        """The tile (frames, positions) the planner itself prices cheapest per query, judged on a tile in the
        middle of the clip and one at its start: 1, 2, 3, 4, 6, 8 or 16 frames, positions a divisor of P (no
        ragged last tile), 32–256 queries. Small tiles keep the candidates near the queries (a query keeps
        2·width − 1 positions of ~16 frames per side; a tile of n frames × t positions scores
        ~(16 + n)·(t + 2·width − 2) per side), large ones make fewer calls. At P = 104, 81 frames the choice (4 × 52) scores 0.126 of S² in the stripes where the earlier
        rule's 256-query tile (16 × 16) scored 0.145: 4–9 % of TSA's time."""
        shapes = [(n, t) for n in (1, 2, 3, 4, 6, 8, 16) if n <= f for t in range(1, p + 1)
                  if p % t == 0 and 32 <= n * t <= TILE_QUERIES] or [(1, min(p, TILE_QUERIES))]

        def per_query(shape):  # a middle tile, and one at the first frames (a short clip's middle may hold no stripe)
            n, t = shape
            tiles = [stripe_tile(i0, n, t * ((p // t) // 2), t) for i0 in sorted({(f - n) // 2, 0})]
            return sum(branch_cost(stripe_member, *tile) for tile in tiles) / sum(q.numel() for q, _ in tiles)

        return min(shapes, key=per_query)

    def stripe_tiles():
        """Tiles of frames × in-frame positions (frame-major: the planner halves them along either axis) with
        the keys their stripes can hold (:func:`stripe_tile`), in the shape of :func:`tile_shape`. A block of
        consecutive tokens holds every in-frame position (256 tokens are 2.5 frames at P = 104), so the planner
        would have to halve it down to a few queries to keep the candidates near them: 1.5× the calls, 10 %
        slower at 81 frames."""
        if width <= 0:  # a stripe narrower than one token holds nothing
            return
        tile_f, tile_p = tile_shape()
        for i0 in range(0, f, tile_f):
            for r0 in range(0, p, tile_p):
                yield stripe_tile(i0, tile_f, r0, tile_p)

    zero = lambda frames: tsa_positions(frames, 0)  # noqa: E731
    return [
        Branch(zero, lambda m, n: original(m, n) & ((m - n).abs() <= d1), band(-d1, d1, seq)),
        Branch(zero, stripe_member, stripes, stripe_tiles),
        Branch(zero, lambda m, n: original(m, n) & ((m - n).abs() > d1) & (n < first),
               lambda q0, q1: torch.arange(min(first, seq))),
        Branch(lambda frames: tsa_positions(frames, 1), lambda m, n: tsa_member(m, n, 1, p, f, round_to, sink_future),
               lambda q0, q1: torch.arange(min(first, seq))),
        Branch(lambda frames: tsa_positions(frames, 2), lambda m, n: tsa_member(m, n, 2, p, f, round_to, sink_future),
               lambda q0, q1: torch.arange(min(last + 1, seq), seq)),
    ]
