"""FreeLOC's geometry against the notes' reference values (freeloc-freeswim-riflex.md §1.2–1.3, §5 cases 5 and 8),
which were computed with the official mask functions at 1560 tokens per frame (Wan 1.3B at 480x832)."""

import pytest
import torch

from longvid.core.freeloc_geometry import (OFFICIAL_VRPR, VrprSettings, stripe_width, sink_future_frame, tsa_branch,
                                           tsa_density, vrpr_branch, vrpr_coverage, vrpr_relative_table,
                                           vrpr_settings)

#: frame distance -> relative position, q at the last frame (notes §1.2); * marks half-dropped distances
TABLE_81 = {**{d: d for d in range(9)}, 9: 9, 10: 10, 11: 11, 12: 11, **{d: 12 for d in range(13, 17)},
            **{d: 13 + (d - 17) // 8 for d in range(17, 81)}}
TABLE_41 = {**{d: d for d in range(11)}, 11: 11, 12: 12, 13: 13, 14: 13, 15: 14, 16: 14, 17: 15, 18: 15, 19: 16,
            20: 16, 21: 17, 22: 17, 23: 17, 24: 17, **{d: 18 + (d - 25) // 8 for d in range(25, 41)}}


@pytest.mark.parametrize("frames, table, gap", [(81, TABLE_81, (9, 10)), (41, TABLE_41, (11, 12))])
def test_vrpr_position_table(frames, table, gap):
    rows = vrpr_relative_table(frames, frames - 1)
    assert {d: rel for d, rel, _ in rows} == table
    assert max(rel for _, rel, _ in rows) == (20 if frames == 81 else 19)  # never beyond the trained 20
    half_dropped = [d for d, _, dropped in rows if dropped > 0.01]  # (the 128-rounding clips 1 % of the next)
    assert half_dropped == list(gap)
    assert all(0.45 < dropped < 0.6 for d, _, dropped in rows if d in gap)


@pytest.mark.parametrize("frames, coverage", [(81, 0.9780), (41, 0.9628)])
def test_vrpr_coverage_and_the_gap_fix(frames, coverage):
    assert round(vrpr_coverage(frames), 4) == coverage  # 2.2 % / 3.7 % of all pairs dropped
    assert vrpr_coverage(frames, gap_fix=True) == 1.0
    assert {d for d, _, dropped in vrpr_relative_table(frames, frames - 1, gap_fix=True) if dropped} == set()


def test_vrpr_branches_are_disjoint_and_cover_everything_else():
    s = vrpr_settings(81)
    d = torch.arange(-81 * 1560 + 1, 81 * 1560)
    branch = vrpr_branch(d, torch.zeros_like(d), 1560, s)
    w1tok = -(-1560 * s.w1 // 128) * 128
    gap = (d.abs() > (s.w1 - 1) * 1560) & (d.abs() < w1tok)
    assert torch.equal(branch == -1, gap)


def test_vrpr_settings_rule():
    assert vrpr_settings(41) == VrprSettings(12, 20, 2, 8) and vrpr_settings(81) == VrprSettings(10, 14, 2, 8)
    assert vrpr_settings(81).offset == 11 and vrpr_settings(41).offset == 14  # the notes' "off"
    for frames in (29, 61, 121, 161):  # any other length: W1 < W2, and the clip holds every position
        s = vrpr_settings(frames)
        assert s.g1 <= s.w1 < s.w2
        assert max(rel for _, rel, _ in vrpr_relative_table(frames, frames - 1) if rel is not None) <= 20
    assert set(OFFICIAL_VRPR) == {41, 81}


def test_tsa_stripe_and_densities():
    assert stripe_width(1560) == 195
    assert round(tsa_density(41), 3) == 0.482
    assert round(tsa_density(81), 3) == 0.298


def test_tsa_future_sink_follows_the_length():
    """Official: keys after frame 78, so nothing at 41 latent frames; longvid: the last 3 frames at any length."""
    assert sink_future_frame(81, "official") == sink_future_frame(81) == 78
    assert sink_future_frame(41, "official") == 78 and sink_future_frame(41) == 38
    p, frames = 16, 41
    keys = torch.arange(frames * p)
    query = torch.tensor([0])  # frame 0: every key beyond 24 frames is in a band-free distance
    official = tsa_branch(query, keys, p, frames, round_to=1, sink_future="official")
    derived = tsa_branch(query, keys, p, frames, round_to=1)
    assert not (official == 2).any()
    assert torch.equal((derived == 2).nonzero().flatten(), keys[keys > 38 * p])


def test_tsa_branches_are_disjoint():
    p, frames = 12, 41
    idx = torch.arange(frames * p)
    branch = tsa_branch(idx[:, None], idx[None, :], p, frames, round_to=1)
    assert set(branch.unique().tolist()) <= {-1, 0, 1, 2}
    first = idx[None, :] < p
    assert ((branch == 1) <= first).all()  # the past sink is the first frame only
