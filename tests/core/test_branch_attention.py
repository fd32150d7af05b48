"""Branch attention (FreeLOC's VRPR and TSA): the blocked, online-merged kernel equals one float64 softmax over
the union of the branches, each key's logit under its own branch's rotation."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from longvid.core.branch_attention import branch_attention, branch_attention_reference
from longvid.core.freeloc_attention import tsa_branches, vrpr_branches
from longvid.core.freeloc_geometry import vrpr_settings
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
