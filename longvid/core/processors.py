"""Attention processors that route the attention core of a diffusers module through a longvid op.

An *attention op* replaces only the ``softmax(QK^T)V`` core: it receives the projected q/k/v in SDPA layout
``(N, heads, S, D)`` plus the site's :class:`~longvid.core.context.TokenLayout`, and returns the attention
output in the same layout, before the output projection. Projections, norms and RoPE stay the model's own,
so one op (FreeLong's spectral blend, a window kernel) works on every model whose adapter installs these
processors, and no method copies projection code. Two optional attributes refine the contract:

- ``op.active() -> bool``: False makes the processor run the model's vanilla attention for this call (a
  step window); on DiTs that goes through diffusers' ``dispatch_attention_fn``, so attention backends and
  context parallelism keep working.
- ``op.pre_rope = True`` (rotary models): the op gets q/k *before* RoPE and a ``rotary=`` helper with the
  position tables and the token grid (``models/wan.py::WanRotary``), to re-encode positions itself.

Ops see one head group at a time (:func:`head_groups`): heads are independent, so this is exact, and it
bounds the op's working set.
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


def op_active(op) -> bool:
    """Whether ``op`` runs for this call (ops without ``active()`` always do)."""
    active = getattr(op, "active", None)
    return True if active is None else bool(active())


def plain_linear(module: torch.nn.Module) -> bool:
    """A bare ``nn.Linear`` whose weight is here: raw-weight fast paths (stacked or sliced weights) are exact for
    it. Not for wrappers (LoRA layers are another type), layers accelerate offloads (a hook brings the weight in at
    forward time; until then it sits on the meta device) nor layers with diffusers hooks (fp8 layerwise casting
    keeps an fp8 weight that only the forward upcasts): those are called as modules instead."""
    if type(module) is not torch.nn.Linear or hasattr(module, "_hf_hook") or module.weight.device.type == "meta":
        return False
    registry = getattr(module, "_diffusers_hook", None)  # diffusers hooks (fp8 layerwise casting upcasts in forward)
    return registry is None or not registry.hooks


def weight_key(t: torch.Tensor) -> tuple[int, int]:
    """(storage address, version) of a weight, for caches derived from it: an in-place edit (a fused LoRA)
    bumps the version. Inference tensors (a model loaded under ``torch.inference_mode()``) keep no version
    counter and cannot be edited in place outside inference mode, so their address alone identifies them."""
    return t.data_ptr(), (-1 if t.is_inference() else t._version)


def head_groups(heads: int, bytes_per_head: int, budget: int) -> int:
    """Heads per group so that one group's q/k/v (``bytes_per_head`` each head) fit ``budget`` bytes."""
    return max(1, min(heads, budget // max(bytes_per_head, 1)))


class StepWindow:
    """An op active only in the half-open fraction ``[start, end)`` of the schedule (``ctx.progress``).

    The one step-window rule of longvid: a step ``i`` of ``total`` is inside when ``start <= i/total < end``;
    ``[0, 1)`` is every step, and windows ``[a, b)`` and ``[b, c)`` split the steps without overlap.
    """

    def __init__(self, op, ctx, start: float, end: float):
        self.op, self.ctx, self.start, self.end = op, ctx, start, end
        self.pre_rope = getattr(op, "pre_rope", False)

    def active(self) -> bool:
        return in_step_window(self.ctx, self.start, self.end) and op_active(self.op)

    def __call__(self, q, k, v, layout, **kwargs):
        return self.op(q, k, v, layout, **kwargs)


def in_step_window(ctx, start: float, end: float) -> bool:
    """``start <= ctx.step / ctx.total_steps < end`` (see :class:`StepWindow`); True without a context."""
    return ctx is None or start <= ctx.progress < end


def input_norms(attn, hidden_states: torch.Tensor, temb=None) -> torch.Tensor:
    """The norms a diffusers ``Attention`` applies to its input before projecting (AttnProcessor2_0 order)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def qk_norms(attn, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's per-head q/k norms (``qk_norm``), if it has them. q/k ``(N, heads, S, D)``."""
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k


class OpAttnProcessor:
    """Self-attention processor for diffusers' ``Attention`` (AnimateDiff motion modules and other UNets).

    Adapted from diffusers==0.42.1 ``attention_processor.AttnProcessor2_0.__call__`` (changes: the SDPA call
    is ``self.op(q, k, v, site.layout)``; self-attention only, as every site a method patches is; q/k/v are
    projected one head group at a time).

    Why head groups: attention heads are independent (and so is any per-channel blend), so projecting and
    attending ``g`` heads at a time is exact, and the output projection can be accumulated group by group
    (``to_out(o) = b + sum_g o_g W_g^T``). Peak memory drops from q+k+v+out+to_out (5x the output) to the
    output plus one group's q/k/v (``group_bytes``); see docs/benchmarks.md for the FreeLong layer.
    """

    def __init__(self, site: AttentionSite, op: AttentionOp, group_bytes: int = 256 << 20):
        self.site = site
        self.op = op
        self.group_bytes = group_bytes
        self._project_qkv = StackedQKV()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.site.name}: longvid attention ops patch self-attention without masks only")
        residual = hidden_states
        hidden_states = input_norms(attn, hidden_states, temb)
        n, seq, _ = hidden_states.shape  # (N, S, C)
        inner = attn.inner_dim  # (to_q may be a wrapper without out_features)
        head_dim = inner // attn.heads
        active = op_active(self.op)
        group = head_groups(attn.heads, 3 * n * seq * head_dim * hidden_states.element_size(), self.group_bytes)
        out_proj = GroupedOutput(attn.to_out[0], n * seq, hidden_states, inner)
        for h0 in range(0, attn.heads, group):
            g = min(group, attn.heads - h0)
            cols = slice(h0 * head_dim, (h0 + g) * head_dim)
            qkv = self._project_qkv(attn, hidden_states, cols).view(n, seq, 3, g, head_dim)  # (N, S, 3, g, D)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (N, g, S, D) each, views
            q, k = qk_norms(attn, q, k)
            heads_out = self.op(q, k, v, self.site.layout) if active else sdpa(q, k, v)  # (N, g, S, D)
            del q, k, v, qkv
            out_proj.add(heads_out.transpose(1, 2).reshape(n * seq, g * head_dim), cols)
        out = attn.to_out[1](out_proj.result().view(n, seq, -1))
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1:  # x / 1 == x exactly; skipping it saves a pass over the output
            out = out / attn.rescale_output_factor
        return out

class StackedQKV:
    """q, k and v of the heads in ``cols`` from one GEMM over the stacked weight rows: ``(N, S, 3·g·D)`` (or the
    projections named in ``names``: ``(N, S, len(names)·g·D)``).

    One GEMM instead of three (three 80-wide projections cost 1.25x one 240-wide one on CPU, three 320-wide ones
    ~1.05x one 960-wide one). The stacked weights are built once per head group and weight version.
    """

    def __init__(self, names: tuple[str, ...] = ("to_q", "to_k", "to_v")):
        self.names = names  # the projections stacked, in order (("to_k", "to_v"): k and v only)
        self._stacked: dict[int, tuple] = {}  # head-group start -> (weights key, stacked q/k/v weight, bias)

    def __call__(self, attn, x: torch.Tensor, cols: slice) -> torch.Tensor:
        projs = tuple(getattr(attn, name) for name in self.names)
        if not all(plain_linear(p) for p in projs):  # LoRA-wrapped or offloaded: project fully, then slice
            return torch.cat([p(x)[..., cols] for p in projs], dim=-1)
        key = (cols.start, cols.stop, *(weight_key(p.weight) for p in projs))
        if self._stacked.get(cols.start, (None,))[0] != key:
            weight = torch.cat([p.weight[cols] for p in projs])  # (3*g*D, C)
            bias = torch.cat([p.bias[cols] for p in projs]) if all(p.bias is not None for p in projs) else None
            if bias is None and any(p.bias is not None for p in projs):
                bias = torch.cat([p.bias[cols] if p.bias is not None else weight.new_zeros(cols.stop - cols.start)
                                  for p in projs])
            self._stacked[cols.start] = (key, weight, bias)
        _, weight, bias = self._stacked[cols.start]
        return F.linear(x, weight, bias)


class GroupedOutput:
    """``to_out[0]`` applied group by group: ``b + sum_g o_g W[:, cols_g]^T`` accumulated in place (plain Linear);
    any other module gets the concatenated input at the end."""

    def __init__(self, linear: torch.nn.Module, rows: int, like: torch.Tensor, in_features: int):
        self.linear, self.dtype = linear, like.dtype
        if plain_linear(linear):
            # created by the first group's product (bias included): no zero fill, no separate bias pass
            self.acc, self.parts = None, None
        else:
            self.acc, self.parts = None, like.new_empty(rows, in_features)

    def add(self, heads_out: torch.Tensor, cols: slice) -> None:
        if self.parts is not None:
            self.parts[:, cols] = heads_out
            return
        weight, bias = self.linear.weight, self.linear.bias
        if self.acc is None:
            o = heads_out.to(self.dtype)
            self.acc = torch.mm(o, weight[:, cols].T) if bias is None else torch.addmm(bias, o, weight[:, cols].T)
        else:
            self.acc.addmm_(heads_out.to(self.acc.dtype), weight[:, cols].T)

    def result(self) -> torch.Tensor:
        return self.acc if self.parts is None else self.linear(self.parts)
