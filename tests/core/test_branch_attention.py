"""Branch attention (FreeLOC's VRPR and TSA): the planned CPU kernel (fused flash attention per task, merged by
log-sum-exp) equals one float64 softmax over the union of the branches, each key's logit under its own branch's
rotation; its plan covers every member pair exactly once; and it scores few logits beyond the kept ones."""

import math

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from longvid.core import branch_attention as ba
from longvid.core.branch_attention import Branch, band, branch_attention, branch_attention_reference
from longvid.core.freeloc_attention import tsa_branches, vrpr_branches
from longvid.core.freeloc_geometry import tsa_branch, vrpr_coverage, vrpr_settings
from longvid.models.wan import WanRotary

GRID = (41, 4, 6)  # latent frames, tokens high, tokens wide (24 tokens per frame)


@pytest.fixture(scope="module")
def setup():
    rope = WanRotaryPosEmbed(36, (1, 1, 1), 1024)
    rotary = WanRotary(rope(torch.zeros(1, 1, *GRID)), rope, GRID)
    g = torch.Generator().manual_seed(0)
    seq = GRID[0] * GRID[1] * GRID[2]
    q, k, v = (torch.randn(1, 2, seq, 36, generator=g) for _ in range(3))
    return rotary, q, k, v


CASES = {
    "vrpr": lambda: vrpr_branches(GRID, vrpr_settings(41), round_to=1),
    "vrpr rounded": lambda: vrpr_branches(GRID, vrpr_settings(41), round_to=16),
    "vrpr gap fix": lambda: vrpr_branches(GRID, vrpr_settings(41), round_to=1, gap_fix=True),
    "tsa": lambda: tsa_branches(GRID, round_to=1),
    "tsa official sink": lambda: tsa_branches(GRID, round_to=1, sink_future="official"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block", [7, 64])
def test_equals_the_union_softmax(case, block, setup):
    rotary, q, k, v = setup
    branches = CASES[case]()
    ref = branch_attention_reference(q, k, v, rotary, branches, GRID)
    cache = {}
    out = branch_attention(q, k, v, rotary, branches, GRID, block=block, cache=cache)
    assert (out.double() - ref).abs().max() <= 2e-6
    assert cache  # the plan (candidate keys and masks) was kept for the next call of this geometry
    assert torch.equal(branch_attention(q, k, v, rotary, branches, GRID, block=block, cache=cache), out)


def test_diagonal_only_is_plain_attention(setup):
    """One branch covering everything with the original positions is exactly RoPE attention."""
    from longvid.core.branch_attention import Branch, band

    rotary, q, k, v = setup
    seq = q.shape[2]
    everything = Branch(lambda frames: (frames, frames), lambda m, n: torch.ones(torch.broadcast_shapes(
        m.shape, n.shape), dtype=torch.bool), band(-seq, seq, seq))
    out = branch_attention(q, k, v, rotary, [everything], GRID, block=50)
    plain = torch.nn.functional.scaled_dot_product_attention(rotary.apply(q), rotary.apply(k), v)
    assert (out - plain).abs().max() <= 2e-6


def test_the_branches_change_the_result(setup):
    rotary, q, k, v = setup
    plain = torch.nn.functional.scaled_dot_product_attention(rotary.apply(q), rotary.apply(k), v)
    for case in ("vrpr", "tsa"):
        assert (branch_attention(q, k, v, rotary, CASES[case](), GRID) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["vrpr", "vrpr gap fix", "tsa"])
def test_flex_block_masks_equal_the_union_softmax(case, setup):
    """The GPU path (one flex_attention per branch on a block mask traced from the same membership predicates,
    merged by their log-sum-exps), run eagerly here."""
    rotary, q, k, v = setup
    branches = CASES[case]()
    ref = branch_attention_reference(q, k, v, rotary, branches, GRID)
    cache = {}
    out = branch_attention(q, k, v, rotary, branches, GRID, backend="flex", cache=cache)
    assert (out.double() - ref).abs().max() <= 2e-6
    assert sum(key[0] == "block_mask" for key in cache) == len(branches)  # one block mask per branch, kept


# ----------------------------------------------------------------------------- more geometries and edge cases


def make(grid, dim=36, heads=2, seed=1):
    rope = WanRotaryPosEmbed(dim, (1, 1, 1), 1024)
    rotary = WanRotary(rope(torch.zeros(1, 1, *grid)), rope, grid)
    g = torch.Generator().manual_seed(seed)
    seq = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, heads, seq, dim, generator=g) for _ in range(3))
    return rotary, q, k, v


GEOMETRIES = {  # (grid, branches); comments say what each one reaches
    # 81 frames: official VRPR settings, the official future sink (after frame 78) exists, P = 12 odd rounding
    "tsa 81x3x4 official sink": ((81, 3, 4), lambda g: tsa_branches(g, round_to=5, sink_future="official")),
    "tsa 81x3x4": ((81, 3, 4), lambda g: tsa_branches(g, round_to=5)),
    "vrpr 81x3x4": ((81, 3, 4), lambda g: vrpr_branches(g, vrpr_settings(81), round_to=5)),
    # odd grid, interpolated VRPR settings, 9-token rounding (bands end mid-frame)
    "tsa 29x5x7": ((29, 5, 7), lambda g: tsa_branches(g, round_to=9)),
    "vrpr 29x5x7": ((29, 5, 7), lambda g: vrpr_branches(g, vrpr_settings(29), round_to=9)),
    "vrpr 29x5x7 gap fix": ((29, 5, 7), lambda g: vrpr_branches(g, vrpr_settings(29), round_to=9, gap_fix=True)),
    # shorter than TSA's stripe band and VRPR's first window: bands clipped by both ends, sinks empty
    "tsa 9x4x6": ((9, 4, 6), lambda g: tsa_branches(g, round_to=1)),
    "tsa 26x4x6": ((26, 4, 6), lambda g: tsa_branches(g, round_to=4)),
    "vrpr 9x4x6": ((9, 4, 6), lambda g: vrpr_branches(g, vrpr_settings(9), round_to=1)),
    # 6 tokens per frame: the stripe is narrower than one token (empty branch)
    "tsa 41x2x3": ((41, 2, 3), lambda g: tsa_branches(g, round_to=1)),
}


@pytest.mark.parametrize("case", list(GEOMETRIES))
@pytest.mark.parametrize("block", [256, 100])
def test_geometries_equal_the_union_softmax(case, block):
    grid, build = GEOMETRIES[case]
    rotary, q, k, v = make(grid, seed=len(case) + block)
    branches = build(grid)
    ref = branch_attention_reference(q, k, v, rotary, branches, grid)
    out = branch_attention(q, k, v, rotary, branches, grid, block=block)
    assert (out.double() - ref).abs().max() <= 2e-6


def covered(plan, branch: int, seq: int) -> torch.Tensor:
    """How many times the plan's tasks of ``branch`` attend to each (query, key) pair (unmasked entries)."""
    count = torch.zeros(seq, seq, dtype=torch.int32)
    every = torch.arange(seq)
    for task in plan:
        if task.branch != branch:
            continue
        rows, cols = every[task.queries], every[task.keys]
        attend = torch.ones(rows.numel(), cols.numel(), dtype=torch.int32) if task.mask is None \
            else (task.mask == 0).int()
        if task.empty is not None:
            assert torch.equal(task.empty, attend.sum(1) == 0)  # exactly the rows without a key are flagged
        else:
            assert bool((attend.sum(1) > 0).all())
        count[rows[:, None], cols[None, :]] += attend
    return count


@pytest.mark.parametrize("case", ["tsa 81x3x4 official sink", "vrpr 81x3x4", "tsa 29x5x7", "vrpr 29x5x7 gap fix",
                                  "tsa 9x4x6", "tsa 41x2x3"])
def test_plan_covers_each_member_pair_exactly_once(case):
    """Independent of numerics: every task's unmasked (query, key) entries, summed per branch, are exactly the
    branch's membership (no pair missed, none counted twice, no non-member attended)."""
    grid, build = GEOMETRIES[case]
    branches = build(grid)
    seq = grid[0] * grid[1] * grid[2]
    plan = ba._plan(branches, seq, 256, 256 << 20, None)
    idx = torch.arange(seq)
    for b, branch in enumerate(branches):
        member = branch.member(idx[:, None], idx[None, :]).int()
        assert torch.equal(covered(plan, b, seq), member), b


def test_plan_scores_few_more_logits_than_it_keeps():
    """The speed property: at the benchmark's frame structure (P = 104, 256-query blocks span 2.5 frames) the
    plan scores 1.22× the logits the geometry keeps for TSA (its stripes in tiles of 4 frames × 52 positions,
    the shape the planner's cost prices cheapest; 256-query tiles of 16 × 16 scored 1.32×, gathering the
    stripes as whole frames for each query block 1.95×) and 1.09× for VRPR (1.15× with a mask over each
    block's whole band), in few calls (TSA: 136 tasks; 359 from contiguous blocks); the kept count is the pure
    geometry's."""
    grid, round_to = (41, 8, 13), 9
    seq = grid[0] * grid[1] * grid[2]
    for name, branches, kept, bound, calls in [
        ("tsa", tsa_branches(grid, round_to), None, 1.25, 150),
        ("vrpr", vrpr_branches(grid, vrpr_settings(41), round_to), vrpr_coverage(41, 104, round_to) * seq ** 2, 1.1,
         200),
    ]:
        plan = ba._plan(branches, seq, 256, 256 << 20, None)
        every = torch.arange(seq)
        scored = sum(every[t.queries].numel() * every[t.keys].numel() for t in plan)
        attended = sum(every[t.queries].numel() * every[t.keys].numel() if t.mask is None
                       else int((t.mask == 0).sum()) for t in plan)
        if kept is None:
            n = torch.arange(seq)
            kept = sum(int((tsa_branch(n[r:r + 512, None], n[None, :], 104, 41, round_to) >= 0).sum())
                       for r in range(0, seq, 512))
        assert attended == round(kept), name
        assert scored <= bound * attended, (name, scored / attended)
        assert len(plan) <= calls, (name, len(plan))


def test_rotations_are_shared_and_equal_rotary_apply():
    grid = GRID
    rotary, q, k, _ = make(grid)
    frame = torch.arange(q.shape[2]) // (grid[1] * grid[2])
    for branches in (tsa_branches(grid, round_to=1), vrpr_branches(grid, vrpr_settings(41), round_to=1)):
        pairs = ba.rotations(q, k, rotary, branches, grid)
        for (qb, kb), branch in zip(pairs, branches):
            qpos, kpos = branch.positions(frame)
            assert (qb - ba.rotated(q, rotary, qpos, grid)).abs().max() <= 1e-6
            assert (kb - ba.rotated(k, rotary, kpos, grid)).abs().max() <= 1e-6
    tsa = ba.rotations(q, k, rotary, tsa_branches(grid, round_to=1), grid)
    assert tsa[0][0] is tsa[1][0] is tsa[2][0] and tsa[0][1] is tsa[2][1]  # the original-position branches
    assert ba._is_pair_rotation(rotary, rotary.cos, rotary.sin)


class HalfRotary:
    """A rotary with another convention (rotate-half: dims i and i + D/2 pair up): the kernel must not use its
    interleaved-pair fast path, only ``apply``."""

    def __init__(self, wan: WanRotary):
        self.wan = wan

    def tables(self, f, h, w):
        return self.wan.tables(f, h, w)

    def apply(self, x, cos, sin):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[..., 0::2], sin[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


def test_another_rotary_convention_uses_its_own_apply(setup):
    wan, q, k, v = setup
    rotary = HalfRotary(wan)
    assert not ba._is_pair_rotation(rotary, wan.cos, wan.sin)
    for branches in (tsa_branches(GRID, round_to=1), vrpr_branches(GRID, vrpr_settings(41), round_to=1)):
        ref = branch_attention_reference(q, k, v, rotary, branches, GRID)
        assert (branch_attention(q, k, v, rotary, branches, GRID).double() - ref).abs().max() <= 2e-6
        assert (branch_attention(q, k, v, wan, branches, GRID) - branch_attention(q, k, v, rotary, branches, GRID)
                ).abs().max() > 1e-3  # the convention matters, so the fast path would have been wrong


def test_queries_without_keys_give_zero(setup):
    """Strictly earlier keys only, split into two branches at a distance inside the blocks: query 0 has no key
    at all and masked tasks have empty rows; the reference's rows are 0 there too."""
    rotary, q, k, v = setup
    seq = q.shape[2]
    same = lambda frames: (frames, frames)  # noqa: E731
    shifted = lambda frames: (frames + 3, frames)  # noqa: E731
    branches = [Branch(same, lambda m, n: (n < m) & (m - n <= 37), band(-37, -1, seq)),
                Branch(shifted, lambda m, n: m - n > 37, band(-seq, -38, seq))]
    ref = branch_attention_reference(q, k, v, rotary, branches, GRID)
    out = branch_attention(q, k, v, rotary, branches, GRID, block=50)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert (out.double() - ref).abs().max() <= 2e-6
    plan = ba._plan(branches, seq, 50, 256 << 20, None)
    assert any(t.empty is not None for t in plan)  # the empty-row path ran


@pytest.mark.parametrize("segment_bytes", [1, 60_000, 1 << 30])
@pytest.mark.parametrize("case", ["empty rows", "tsa"])
def test_segments_merge_like_one(setup, monkeypatch, segment_bytes, case):
    """The task outputs are merged per segment of the plan (``SEGMENT_BYTES``) and the segments folded into a
    running sum: one task per segment, a few, and the whole plan in one all give the union softmax, with a
    query's parts split across segments, empty rows (query 0 has no key) and gathered queries (TSA's
    stripes)."""
    grid = GRID if case == "empty rows" else (21, 8, 13)  # P = 104: stripe tiles of part of a frame
    rotary, q, k, v = setup if case == "empty rows" else make(grid, seed=5)
    seq = q.shape[2]
    same = lambda frames: (frames, frames)  # noqa: E731
    shifted = lambda frames: (frames + 3, frames)  # noqa: E731
    branches = [Branch(same, lambda m, n: (n < m) & (m - n <= 37), band(-37, -1, seq)),
                Branch(shifted, lambda m, n: m - n > 37, band(-seq, -38, seq))] if case == "empty rows" else \
        tsa_branches(grid, round_to=9)
    ref = branch_attention_reference(q, k, v, rotary, branches, grid)
    monkeypatch.setattr(ba, "SEGMENT_BYTES", segment_bytes)
    plan = ba._plan(branches, seq, 50, 256 << 20, None)
    row = q.shape[0] * q.shape[1] * q.shape[3] * 4
    segments = ba._segments(plan, row)
    assert [t for tasks, *_ in segments for t in tasks] == list(plan)
    if segment_bytes == 1:
        assert len(segments) == len(plan)  # one task per segment
    elif segment_bytes == 1 << 30:
        assert len(segments) == 1  # the whole plan in one
    else:
        assert 1 < len(segments) < len(plan)  # a few tasks per segment
    assert ba._segments(plan, row) is segments  # kept on the plan
    assert any(t.empty is not None for t in plan)  # rows without a key in some task
    assert any(not isinstance(t.queries, slice) for t in plan) == (case == "tsa")
    out = branch_attention(q, k, v, rotary, branches, grid, block=50)
    if case == "empty rows":
        assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert (out.double() - ref).abs().max() <= 2e-6


def test_plan_cache_kept_reused_and_bounded(setup):
    rotary, q, k, v = setup
    branches = tsa_branches(GRID, round_to=1)
    cache = {}
    out = branch_attention(q, k, v, rotary, branches, GRID, cache=cache)
    (key, plan), = [(key, p) for key, p in cache.items() if key[0] == "plan"]
    assert ba._plan(branches, q.shape[2], 256, 256 << 20, cache) is plan  # looked up, not rebuilt
    assert 0 < ba.plan_bytes(plan) <= 256 << 20
    small = {}
    assert torch.equal(branch_attention(q, k, v, rotary, branches, GRID, mask_bytes=0, cache=small), out)
    assert not small  # larger than mask_bytes: rebuilt every call, same result


def test_math_fallback_equals_the_cpu_flash_kernel():
    """The non-CPU statement of one task (the blocked path on another device) against the fused CPU kernel."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 70, 16, generator=g), \
        torch.randn(1, 2, 70, 16, generator=g)
    mask = torch.zeros(40, 70).masked_fill_(torch.rand(40, 70, generator=g) < 0.6, float("-inf"))
    out, lse = ba._attend(q, k, v, mask, 0.25)
    out2, lse2 = ba._attend_math(q, k, v, mask, 0.25)
    assert (out - out2).abs().max() <= 1e-6 and (lse - lse2).abs().max() <= 1e-5
    assert math.isclose(float(lse2[0, 0, 0]), float(torch.logsumexp(q[0, 0, 0] @ k[0, 0].T * 0.25 + mask[0], 0)),
                        rel_tol=1e-5)


def test_low_precision_inputs(setup):
    rotary, q, k, v = setup
    branches = vrpr_branches(GRID, vrpr_settings(41), round_to=1)
    ref = branch_attention_reference(q, k, v, rotary, branches, GRID)
    out = branch_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), rotary, branches, GRID)
    assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max() <= 3e-2


def test_coalesced_tasks_only_join_adjoining_queries(setup):
    """Unmasked tasks with the same keys are joined into one call only across adjoining query blocks: here a
    sink-like branch holds the first 10 keys for every other block of 50 queries, so joining across the gap
    would hand those keys to the blocks between."""
    rotary, q, k, v = setup
    seq = q.shape[2]
    branches = [Branch(lambda frames: (frames, frames), lambda m, n: (n >= 10) & ((m - n).abs() <= 40),
                       band(-40, 40, seq)),
                Branch(lambda frames: (frames + 3, frames), lambda m, n: (n < 10) & ((m // 50) % 2 == 0),
                       lambda q0, q1: torch.arange(10))]
    plan = ba._plan(branches, seq, 50, 256 << 20, None)
    sink = [t.queries for t in plan if t.branch == 1]
    assert sink and all(isinstance(s, slice) and s.stop - s.start == 50 for s in sink)  # never joined over a gap
    idx = torch.arange(seq)
    for b, branch in enumerate(branches):
        assert torch.equal(covered(plan, b, seq), branch.member(idx[:, None], idx[None, :]).int())
    ref = branch_attention_reference(q, k, v, rotary, branches, GRID)
    assert (branch_attention(q, k, v, rotary, branches, GRID, block=50).double() - ref).abs().max() <= 2e-6


def test_coalesced_sink_is_one_call():
    """TSA's past sink (the first frame of keys for every query beyond the stripe band) is one call, not one per
    query block."""
    grid = (81, 3, 4)
    branches = tsa_branches(grid, round_to=5)
    plan = ba._plan(branches, 81 * 12, 64, 256 << 20, None)
    assert sum(t.branch == 3 and t.mask is None for t in plan) == 1
