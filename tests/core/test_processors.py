"""OpAttnProcessor: the op seam reproduces diffusers' AttnProcessor2_0, also one head group at a time."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from longvid.core.context import AttentionSite, TokenLayout
from longvid.core.processors import OpAttnProcessor, sdpa


@pytest.mark.parametrize("group_bytes", [256 << 20, 1])  # all heads at once; one head per group
@pytest.mark.parametrize("qk_norm", [None, "layer_norm"])
def test_op_processor_with_sdpa_equals_attn_processor(group_bytes, qk_norm):
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8, bias=True, qk_norm=qk_norm).eval()
    x = torch.randn(6, 10, 32)  # (B*H*W, F, C)
    site = AttentionSite("attn", attn, "temporal", layout=TokenLayout("temporal", 1, 10, 2, 3))
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x)
        attn.set_processor(OpAttnProcessor(site, sdpa, group_bytes=group_bytes))
        ours = attn(x)
    assert (ours - ref).abs().max() <= 1e-6
    assert ref.abs().max() > 0.1


def test_op_sees_each_head_group_and_the_layout():
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    layout = TokenLayout("temporal", 1, 10, 2, 3)
    calls = []

    def op(q, k, v, lay):
        calls.append((q.shape, lay))
        return sdpa(q, k, v)

    site = AttentionSite("attn", attn, "temporal", layout=layout)
    # 3 * N * S * D * 4 bytes per head = 5760: a budget of two heads -> two groups of two
    attn.set_processor(OpAttnProcessor(site, op, group_bytes=2 * 3 * 6 * 10 * 8 * 4))
    with torch.no_grad():
        attn(torch.randn(6, 10, 32))
    assert calls == [(torch.Size([6, 2, 10, 8]), layout)] * 2
