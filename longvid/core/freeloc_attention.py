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

from longvid.core.branch_attention import Branch, band
from longvid.core.freeloc_geometry import (TSA_WINDOW_1, TSA_WINDOW_2, VrprSettings, round_up, sink_future_frame,
                                           stripe_width, tsa_member, tsa_positions, vrpr_member, vrpr_positions)

Tensor = torch.Tensor
TILE_QUERIES = 256  # TSA's stripe tiles before the planner halves them (bounds each membership mask it builds)


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

    def stripe_tiles():
        """Tiles of frames × in-frame positions (frame-major: the planner halves them along either axis) with
        the keys their stripes can hold: the frames at token distance (d1, d2] on either side, the positions
        within the stripe width of the tile's. A block of consecutive tokens holds every in-frame position (256
        tokens are 2.5 frames at P = 104), so the planner would have to halve it down to a few queries to keep
        the candidates near them: 1.5× the calls, 10 % slower at 81 frames."""
        if width <= 0:  # a stripe narrower than one token holds nothing
            return
        # the shape whose candidates hold the fewest keys per kept one: (span + frames) / span key frames per
        # frame a query keeps, min(P, positions + 2·width − 2) / (2·width − 1) key positions per kept one
        span = (d2 - d1) / p
        shapes = [(n, min(p, TILE_QUERIES // n)) for n in (1, 2, 4, 8, 16, 32, 64) if n <= min(f, TILE_QUERIES)]
        tile_f, tile_p = min(shapes, key=lambda s: (span + s[0]) / span * min(p, s[1] + 2 * width - 2))
        for i0 in range(0, f, tile_f):
            frames = torch.arange(i0, min(i0 + tile_f, f))
            for r0 in range(0, p, tile_p):
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
                yield queries, keys[keys >= first]

    zero = lambda frames: tsa_positions(frames, 0)  # noqa: E731
    return [
        Branch(zero, lambda m, n: original(m, n) & ((m - n).abs() <= d1), band(-d1, d1, seq)),
        Branch(zero, lambda m, n: original(m, n) & ((m - n).abs() > d1) & (n >= first), stripes,
               stripe_tiles),
        Branch(zero, lambda m, n: original(m, n) & ((m - n).abs() > d1) & (n < first),
               lambda q0, q1: torch.arange(min(first, seq))),
        Branch(lambda frames: tsa_positions(frames, 1), lambda m, n: tsa_member(m, n, 1, p, f, round_to, sink_future),
               lambda q0, q1: torch.arange(min(first, seq))),
        Branch(lambda frames: tsa_positions(frames, 2), lambda m, n: tsa_member(m, n, 2, p, f, round_to, sink_future),
               lambda q0, q1: torch.arange(min(last + 1, seq), seq)),
    ]
