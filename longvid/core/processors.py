"""Attention processors that route the attention core of a diffusers module through a longvid op.

An *attention op* replaces only the ``softmax(QK^T)V`` core: it receives the projected q/k/v in SDPA layout
``(N, heads, S, D)`` plus the site's :class:`~longvid.core.context.TokenLayout`, and returns the attention
output in the same layout, before the output projection. Projections, norms and RoPE stay the model's own,
so one op (FreeLong's spectral blend, a window kernel) works on every model whose adapter installs these
processors, and no method copies projection code.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from longvid.core.context import AttentionSite, TokenLayout


class AttentionOp(Protocol):
    """``op(q, k, v, layout) -> out``; q/k/v/out are ``(N, heads, S, D)``; see module docstring."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor: ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
    """The vanilla op: full attention with torch SDPA."""
    return F.scaled_dot_product_attention(q, k, v)


class OpAttnProcessor:
    """Self-attention processor for diffusers' ``Attention`` (AnimateDiff motion modules and other UNets).

    Adapted from diffusers==0.42.1 ``attention_processor.AttnProcessor2_0.__call__`` (changes: the SDPA call
    is ``self.op(q, k, v, site.layout)``; self-attention only, as every site a method patches is; q/k/v are
    projected one head group at a time).

    Why head groups: attention heads are independent (and so is any per-channel blend), so projecting and
    attending ``g`` heads at a time is exact, and peak memory drops from q+k+v+out (4x the output) to the
    output plus one group's q/k/v (``group_bytes``). Measured on the FreeLong layer at F=256: 3.0x -> 5.4x
    less peak memory than the official code (docs/benchmarks.md).
    """

    def __init__(self, site: AttentionSite, op: AttentionOp, group_bytes: int = 256 << 20):
        self.site = site
        self.op = op
        self.group_bytes = group_bytes

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.site.name}: longvid attention ops patch self-attention without masks only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        n, seq, _ = hidden_states.shape  # (N, S, C)
        inner = attn.to_q.out_features
        head_dim = inner // attn.heads
        group = max(1, min(attn.heads, self.group_bytes // (3 * n * seq * head_dim * hidden_states.element_size())))
        out = hidden_states.new_empty(n, seq, inner)  # (N, S, heads*D): the attention output before to_out
        for h0 in range(0, attn.heads, group):
            g = min(group, attn.heads - h0)
            cols = slice(h0 * head_dim, (h0 + g) * head_dim)
            q, k, v = (_project(proj, hidden_states, cols).view(n, seq, g, head_dim).transpose(1, 2)
                       for proj in (attn.to_q, attn.to_k, attn.to_v))  # (N, g, S, D)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            out[..., cols] = self.op(q, k, v, self.site.layout).transpose(1, 2).reshape(n, seq, g * head_dim)
            del q, k, v
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _project(proj: torch.nn.Module, x: torch.Tensor, cols: slice) -> torch.Tensor:
    """Output features ``cols`` of a linear projection; other modules (e.g. LoRA-wrapped) project fully."""
    if type(proj) is torch.nn.Linear:
        bias = proj.bias[cols] if proj.bias is not None else None
        return F.linear(x, proj.weight[cols], bias)
    return proj(x)[..., cols]
