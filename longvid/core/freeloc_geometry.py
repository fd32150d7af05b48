"""FreeLOC's geometry as pure functions of the token grid: VRPR branches and positions, TSA tiers and sinks.

FreeLOC (Westlake-AGI-Lab, CVPR 2026) extends a DiT beyond its trained length with two per-layer treatments of
self-attention, both described here exactly as the notes restate the official code (freeloc-freeswim-riflex.md
§1.2–1.3), with the quirks as options:

**VRPR** (layers sensitive to relative positions): five branches by *token* distance Δ = m − n (flattened (f, h, w)
indices, P tokens per frame, bands rounded up to multiples of ``round_to`` = 128 as the official flex masks are):

====================  ==============================  ==========================================  =================
branch                token band                      query temporal position                     key position
====================  ==============================  ==========================================  =================
0 diag                \\|Δ\\| ≤ (W1−1)·P              i                                           j
1 mid-past            r(W1·P) ≤ Δ < r(W2·P)           ⌊i/G1⌋ + ⌊W1 − W1/G1⌋                       ⌊j/G1⌋
2 mid-future          −r(W2·P) < Δ ≤ −r(W1·P)         ⌊i/G1⌋                                      ⌊j/G1⌋ + ⌊W1 − W1/G1⌋
3 far-past            Δ ≥ r(W2·P)                     min(⌊i/G2⌋ + off, clip)                     ⌊j/G2⌋
4 far-future          Δ ≤ −r(W2·P)                    ⌊i/G2⌋                                      min(⌊j/G2⌋ + off, clip)
====================  ==============================  ==========================================  =================

with i, j the frames of m and n, ``off = W2 − ⌊W2/G2⌋ − ⌊(W2−W1)/G1⌋`` and ``clip = 20`` (Wan's largest trained
relative position). Pairs with (W1−1)·P < |Δ| < r(W1·P) belong to no branch (the official one-frame gap);
``gap_fix`` widens the diagonal band to close it. Each branch rotates q and k with its own temporal positions;
the five branches are merged as one softmax over their (disjoint) union.

**TSA** (layers sensitive to context length): three branches,

- diag (original positions): dense for \\|Δ\\| ≤ r(D1·P) (D1 = 8 frames), a raster *stripe*
  \\|(m mod P) − (n mod P)\\| < ``stripe_width(P)`` for r(D1·P) < \\|Δ\\| ≤ r(D2·P) (D2 = 24), and the keys
  n < r(P) (the first frame) for \\|Δ\\| ≤ r(D2·P);
- sink-past: n < r(P) and Δ > r(D2·P), positions q = ⌊i/8⌋ + 10, k = ⌊j/8⌋;
- sink-future: n > r(T·P) and Δ < −r(D2·P), positions q = ⌊i/8⌋, k = ⌊j/8⌋ + 10, where the official code
  hard-codes T = 78 (the last ~3 frames at 81 latent frames, nothing at 41); longvid's default derives
  T = F − 3 from the length (``sink_future="official"`` keeps 78).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

#: Official VRPR frame settings by latent frames: (W1, W2, G1, G2).
OFFICIAL_VRPR = {41: (12, 20, 2, 8), 81: (10, 14, 2, 8)}
#: Wan's largest trained relative temporal position (21 latent frames: 0..20).
VRPR_CLIP = 20
TSA_WINDOW_1, TSA_WINDOW_2 = 8, 24  # dense band and stripe band, in frames
SINK_GROUP, SINK_SHIFT = 8, 10  # sink positions: ⌊x/8⌋ (+ 10 = ⌊12 − 12/8⌋ on the query or key side)
OFFICIAL_SINK_FRAME = 78


def round_up(x: int, to: int) -> int:
    """``ceil(x / to) · to`` (the official flex masks round every band to 128-token blocks)."""
    return -(-x // to) * to


# -------------------------------------------------------------------------------------------------- VRPR


@dataclass(frozen=True)
class VrprSettings:
    w1: int
    w2: int
    g1: int
    g2: int
    clip: int = VRPR_CLIP

    @property
    def offset(self) -> int:
        return self.w2 - self.w2 // self.g2 - (self.w2 - self.w1) // self.g1

    @property
    def mid_shift(self) -> int:
        """⌊W1 − W1/G1⌋: the official float then ``.long()``."""
        return int(math.floor(self.w1 - self.w1 / self.g1))


def vrpr_settings(latent_frames: int) -> VrprSettings:
    """The official settings at 41 and 81 latent frames; any other length gets W1, W2 on the line through those
    two points (G1 = 2, G2 = 8 as both), rounded, with W1 ≥ G1 and W2 ≥ W1 + G1 — longvid's documented rule;
    the clip keeps every relative position within training whatever the length."""
    if latent_frames in OFFICIAL_VRPR:
        return VrprSettings(*OFFICIAL_VRPR[latent_frames])
    (f0, (a0, b0, g1, g2)), (f1, (a1, b1, _, _)) = sorted(OFFICIAL_VRPR.items())
    t = (latent_frames - f0) / (f1 - f0)
    w1 = max(g1, round(a0 + t * (a1 - a0)))
    w2 = max(w1 + g1, round(b0 + t * (b1 - b0)))
    return VrprSettings(w1, w2, g1, g2)


def vrpr_member(m: Tensor, n: Tensor, branch: int, tokens_per_frame: int, s: VrprSettings, round_to: int = 128,
                gap_fix: bool = False) -> Tensor:
    """Whether (query m, key n) pairs are in VRPR ``branch`` (elementwise, traceable by ``flex_attention``)."""
    p = tokens_per_frame
    delta = m - n
    w1tok, w2tok = round_up(p * s.w1, round_to), round_up(p * s.w2, round_to)
    if branch == 0:
        return delta.abs() < w1tok if gap_fix else delta.abs() <= (s.w1 - 1) * p
    if branch == 1:
        return (delta >= w1tok) & (delta < w2tok)
    if branch == 2:
        return (delta > -w2tok) & (delta <= -w1tok)
    if branch == 3:
        return delta >= w2tok
    return delta <= -w2tok


def vrpr_branch(m: Tensor, n: Tensor, tokens_per_frame: int, s: VrprSettings, round_to: int = 128,
                gap_fix: bool = False) -> Tensor:
    """Branch of each (query m, key n) pair: 0..4 as in the module docstring, −1 for none (the gap)."""
    branch = torch.full(torch.broadcast_shapes(m.shape, n.shape), -1, dtype=torch.int8, device=m.device)
    for b in range(5):
        branch = torch.where(vrpr_member(m, n, b, tokens_per_frame, s, round_to, gap_fix), b, branch)
    return branch


def vrpr_positions(frames: Tensor, branch: int, s: VrprSettings) -> tuple[Tensor, Tensor]:
    """(query positions, key positions) of frame indices ``frames`` in ``branch`` (integer tensors)."""
    if branch == 0:
        return frames, frames
    if branch in (1, 2):
        shifted, plain = frames // s.g1 + s.mid_shift, frames // s.g1
        return (shifted, plain) if branch == 1 else (plain, shifted)
    shifted, plain = (frames // s.g2 + s.offset).clamp(max=s.clip), frames // s.g2
    return (shifted, plain) if branch == 3 else (plain, shifted)


def vrpr_relative_table(latent_frames: int, query_frame: int, tokens_per_frame: int = 1560, round_to: int = 128,
                        gap_fix: bool = False) -> list[tuple[int, int | None, float]]:
    """For each frame distance d from ``query_frame`` to an earlier key frame: (d, the relative position most of
    its token pairs see, the share of its pairs that no branch covers). Exact: for frame distance d the token
    distance is d·P + δ with δ = (m mod P) − (n mod P), and P − |δ| pairs share each δ."""
    s = vrpr_settings(latent_frames)
    p = tokens_per_frame
    delta = torch.arange(-(p - 1), p, dtype=torch.int64)  # in-frame offset
    count = (p - delta.abs()).double()  # pairs per offset
    rows = []
    for d in range(query_frame + 1):
        j = query_frame - d
        branch = vrpr_branch(d * p + delta, torch.zeros_like(delta), p, s, round_to, gap_fix)
        votes: dict[int, float] = {}
        for b in range(5):
            share = count[branch == b].sum().item()
            if share:
                q_pos, _ = vrpr_positions(torch.tensor([query_frame]), b, s)
                _, k_pos = vrpr_positions(torch.tensor([j]), b, s)
                rel = int(q_pos - k_pos)
                votes[rel] = votes.get(rel, 0.0) + share
        dropped = count[branch == -1].sum().item() / count.sum().item()
        rows.append((d, max(votes, key=votes.get) if votes else None, dropped))
    return rows


def vrpr_coverage(latent_frames: int, tokens_per_frame: int = 1560, round_to: int = 128,
                  gap_fix: bool = False) -> float:
    """Share of all ordered (q, k) pairs some VRPR branch covers (exact: S − |D| pairs have token distance D)."""
    s = vrpr_settings(latent_frames)
    total = latent_frames * tokens_per_frame
    dist = torch.arange(-(total - 1), total, dtype=torch.int64)
    branch = vrpr_branch(dist, torch.zeros_like(dist), tokens_per_frame, s, round_to, gap_fix)
    weight = (total - dist.abs()).double()
    return weight[branch >= 0].sum().item() / total**2


# --------------------------------------------------------------------------------------------------- TSA


def stripe_width(tokens_per_frame: int, window_1: int = TSA_WINDOW_1, window_2: int = TSA_WINDOW_2) -> int:
    """Half-width of TSA's raster stripe: band = (D2−D1)//(D1/2), width = band/(D2−D1), ⌊width·P⌋//2
    (195 at P = 1560)."""
    band = (window_2 - window_1) // (window_1 / 2)
    width = band / (window_2 - window_1)
    return int((width * tokens_per_frame) // 2)


def sink_future_frame(latent_frames: int, mode: str = "auto") -> int:
    """The frame after which keys are the future sink: 78 (official, hard-coded) or ``latent_frames − 3``."""
    if mode == "official":
        return OFFICIAL_SINK_FRAME
    if mode == "auto":
        return latent_frames - 3
    raise ValueError(f"sink_future must be 'auto' or 'official', got {mode!r}")


def tsa_member(m: Tensor, n: Tensor, branch: int, tokens_per_frame: int, latent_frames: int, round_to: int = 128,
               sink_future: str = "auto") -> Tensor:
    """Whether (query m, key n) pairs are in TSA ``branch`` 0, 1 or 2 (elementwise, traceable by flex)."""
    p = tokens_per_frame
    delta = m - n
    d1, d2 = round_up(TSA_WINDOW_1 * p, round_to), round_up(TSA_WINDOW_2 * p, round_to)
    first = round_up(p, round_to)
    if branch == 0:
        stripe = ((m % p) - (n % p)).abs() < stripe_width(p)
        far = delta.abs() > d1
        return (delta.abs() <= d1) | (far & (delta.abs() <= d2) & (stripe | (n < first)))
    if branch == 1:
        return (n < first) & (delta > d2)
    last = round_up(sink_future_frame(latent_frames, sink_future) * p, round_to)
    return (n > last) & (delta < -d2)


def tsa_branch(m: Tensor, n: Tensor, tokens_per_frame: int, latent_frames: int, round_to: int = 128,
               sink_future: str = "auto") -> Tensor:
    """Branch of each (query m, key n) pair: 0 diag, 1 sink-past, 2 sink-future, −1 none."""
    branch = torch.full(torch.broadcast_shapes(m.shape, n.shape), -1, dtype=torch.int8, device=m.device)
    for b in range(3):
        member = tsa_member(m, n, b, tokens_per_frame, latent_frames, round_to, sink_future)
        branch = torch.where(member, b, branch)
    return branch


def tsa_positions(frames: Tensor, branch: int) -> tuple[Tensor, Tensor]:
    """(query positions, key positions) of frame indices in a TSA branch."""
    if branch == 0:
        return frames, frames
    shifted, plain = frames // SINK_GROUP + SINK_SHIFT, frames // SINK_GROUP
    return (shifted, plain) if branch == 1 else (plain, shifted)


def tsa_density(latent_frames: int, tokens_per_frame: int = 1560, samples: int = 2_000_000, seed: int = 0,
                round_to: int = 128, sink_future: str = "official") -> float:
    """Share of all (q, k) pairs TSA attends to, estimated on ``samples`` uniform random pairs (the notes'
    method; the striped band depends on absolute in-frame positions, so there is no short closed form)."""
    total = latent_frames * tokens_per_frame
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, total, (samples,), generator=g)
    n = torch.randint(0, total, (samples,), generator=g)
    return (tsa_branch(m, n, tokens_per_frame, latent_frames, round_to, sink_future) >= 0).double().mean().item()
