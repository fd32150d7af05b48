"""Context windows: views, weights, the fusion plan and weighted fusion."""

import pytest
import torch

from longvid.core.windows import context_views, frame_weight_counts, fuse, fusion_plan, window_weights
from tests.core.window_helpers import PYRAMID_16


# ---------------------------------------------------------------------------------------------- views/weights


def test_context_views():
    assert context_views(64, 16, 4) == [(s, s + 16) for s in range(0, 49, 4)]
    assert context_views(26, 16, 4) == [(0, 16), (4, 20), (8, 24), (10, 26)]
    assert context_views(130, 16, 4)[-2:] == [(112, 128), (114, 130)]
    assert context_views(16, 16, 4) == [(0, 16)]
    assert context_views(9, 16, 4) == [(0, 9)]
    assert context_views(81, 21, 5)[-1] == (60, 81)


def test_window_weights():
    assert window_weights(16, "pyramid").tolist() == PYRAMID_16
    assert window_weights(5, "pyramid").tolist() == [1, 2, 3, 2, 1]
    assert window_weights(4, "flat").tolist() == [1, 1, 1, 1]
    assert window_weights(4, "delayed_reverse_sawtooth").tolist() == [0.01, 2, 2, 1]
    assert window_weights(5, "delayed_reverse_sawtooth").tolist() == [0.01, 0.01, 3, 2, 1]
    for n in range(1, 24):
        for scheme in ("pyramid", "flat", "delayed_reverse_sawtooth"):
            assert window_weights(n, scheme).numel() == n
    with pytest.raises(ValueError, match="unknown weighting"):
        window_weights(16, "triangle")


def test_frame_weight_counts_f128():
    counts = frame_weight_counts(128, 16, 4).tolist()
    assert counts[:14] == [1, 2, 3, 4, 6, 8, 10, 12, 14, 15, 16, 17, 18, 18]
    assert counts[12:116] == [18] * 104  # constant interior
    assert counts[-12:] == counts[:12][::-1]


def test_hand_checkable_fusion_f24():
    """Notes §5 case 7: views (0,16), (4,20), (8,24) output the constants 0, 1, 2."""
    plan = fusion_plan(24, 16, 4)
    assert plan.views == ((0, 16), (4, 20), (8, 24))
    outs = [torch.full((1, 16, 1), float(i), dtype=torch.float64) for i in range(3)]
    fused = fuse(outs, plan, dim=1)[0, :, 0]
    expected = {4: 1 / 6, 10: 13 / 16, 12: 18 / 17, 16: 5 / 3, 20: 2.0}
    for frame, value in expected.items():
        assert fused[frame].item() == pytest.approx(value, abs=1e-12), frame
    assert frame_weight_counts(24, 16, 4)[[4, 10, 12]].tolist() == [6, 16, 17]


def test_tail_view_uses_weight_slice():
    """F=27: the tail view (11, 27) alone fills frames 24..26, with weights w[-3:] = [3, 2, 1]."""
    plan = fusion_plan(27, 16, 4)
    assert plan.views[-1] == (11, 27)
    assert plan.weights[-1].tolist() == [0] * 13 + [3, 2, 1]
    outs = [torch.full((1, 16, 1), float(i + 1)) for i in range(len(plan.views))]
    assert fuse(outs, plan)[0, 24:, 0].tolist() == [4.0, 4.0, 4.0]  # the tail view's output, unscaled
