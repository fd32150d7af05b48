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

    Adapted from diffusers==0.42.1 ``attention_processor.AttnProcessor2_0.__call__`` (change: the SDPA call
    is ``self.op(q, k, v, site.layout)``; self-attention only, as every site a method patches is).
    """

    def __init__(self, site: AttentionSite, op: AttentionOp):
        self.site = site
        self.op = op

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.site.name}: longvid attention ops patch self-attention without masks only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        n, seq, _ = hidden_states.shape  # (N, S, C)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(n, seq, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (N, heads, S, D)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self.op(q, k, v, self.site.layout)  # (N, heads, S, D)
        out = out.transpose(1, 2).reshape(n, seq, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
