"""FreeNoise window fusion per attention layer (official VideoCrafter FreeNoise, notes §2.2).

Each view of ``window`` frames attends within itself; the views' outputs are weight-averaged per frame
(:mod:`longvid.core.windows`), then ``to_out`` runs once. Installed as a diffusers attention processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longvid.core.processors import input_norms, qk_norms, weight_key
from longvid.core.windows import FusionPlan, WindowAccumulator, check_window, fusion_plan, window_weights


class WindowFusedAttnProcessor:
    """Temporal self-attention over overlapping windows, fused per layer (official VideoCrafter FreeNoise).

    For any diffusers ``Attention`` whose input is ``(B·H·W, F, C)``: q/k/v are projected once for all
    frames, every view attends within its frames, the view outputs are weight-averaged per frame, then
    ``to_out`` runs once. ``F ≤ window`` is exactly ``AttnProcessor2_0`` (one view, no weighting).

    ``pos_embed``: an additive absolute positional embedding (diffusers ``SinusoidalPositionalEmbedding``,
    ``x + pe[:, :S]``) applied *window-locally* (positions restart at 0 in every view, as the official
    AnimateDiff port does). The caller must disable the block's own ``pos_embed`` so it is not added twice.
    It costs no extra projection: for an affine projection ``W(x + p) + b = (Wx + b) + Wp``, so ``W·pe`` is
    computed once (``window × C``) and added to each view's slice of the projected q/k/v.
    """

    def __init__(
        self, window: int = 16, stride: int = 4, weighting: str = "pyramid", pos_embed: nn.Module | None = None,
        chunk_bytes: int | None = None,
    ):
        check_window(window, stride)
        # bound on the gathered views of one chunk of rows; None: 16 MiB on a CPU (cache-sized), 256 MiB on a GPU
        self.chunk_bytes = chunk_bytes
        window_weights(window, weighting)  # validates the scheme name early
        self.window = window
        self.stride = stride
        self.weighting = weighting
        self.pos_embed = pos_embed
        self._positions: dict[tuple, tuple] = {}  # (len, dtype, device, weight versions) -> projected W·pe

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        self._check_call(attn, hidden_states, encoder_hidden_states, attention_mask)
        residual = hidden_states
        hidden_states = input_norms(attn, hidden_states, temb)
        n, frames, _ = hidden_states.shape  # (N, F, C)
        projections = (attn.to_q, attn.to_k, attn.to_v)
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in projections)  # (N, h, F, D), projected once
        plan = fusion_plan(frames, self.window, self.stride, self.weighting)
        pos = self._projected_positions(attn, hidden_states, len_=plan.views[0][1] - plan.views[0][0])
        if pos is None:  # norms can run once over all frames
            q, k = qk_norms(attn, q, k)
        out = self._fused_attention(attn, q, k, v, plan, pos)  # (N, h, F, D)
        out = out.transpose(1, 2).reshape(n, frames, -1).to(q.dtype)  # (N, F, h·D)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _fused_attention(self, attn, q, k, v, plan: FusionPlan, pos) -> torch.Tensor:
        """Attention within each view, weight-averaged per frame. q/k/v/out ``(N, h, F, D)``.

        All views have ``window`` frames (the tail view too), so they are gathered into one extra batch axis and
        attended in one SDPA call per chunk of rows (``(n, h, V, L, D)``) instead of one small call per view;
        the chunk keeps the gathered q/k/v/out under ``chunk_bytes``.
        """
        if len(plan.views) == 1:  # F ≤ window: plain attention, bit-identical to AttnProcessor2_0
            return self._view_attention(attn, q, k, v, pos)
        n, heads, _, dim = q.shape
        starts = torch.tensor([s for s, _ in plan.views], device=q.device)
        index = starts[:, None] + torch.arange(self.window, device=q.device)  # (V, L)
        views = len(plan.views)
        budget = self.chunk_bytes or ((256 << 20) if q.is_cuda else (16 << 20))
        step = max(1, budget // max(4 * heads * views * self.window * dim * q.element_size(), 1))
        out = torch.empty_like(v)  # (N, h, F, D)
        for r0 in range(0, n, step):
            rows = slice(r0, min(r0 + step, n))
            qv, kv, vv = (t[rows][:, :, index] for t in (q, k, v))  # (n, h, V, L, D)
            if pos is not None:
                qv, kv, vv = qv + pos[0][:, None], kv + pos[1][:, None], vv + pos[2][:, None]
                qv, kv = qk_norms(attn, qv, kv)
            attended = F.scaled_dot_product_attention(qv, kv, vv)  # (n, h, V, L, D)
            acc = WindowAccumulator(plan, v[rows], dim=2)
            for i in range(views):
                acc.add(i, attended[:, :, i])  # (n, h, L, D)
            out[rows] = acc.result()
        return out

    @staticmethod
    def _view_attention(attn, q, k, v, pos) -> torch.Tensor:
        """SDPA over one view; ``pos`` = projected (pq, pk, pv), each ``(h, L, D)``, added window-locally."""
        if pos is not None:
            q, k, v = q + pos[0], k + pos[1], v + pos[2]
            q, k = qk_norms(attn, q, k)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)  # (N, h, L, D)

    def _projected_positions(self, attn, x: torch.Tensor, len_: int):
        """``W·pe[:len_]`` for q, k and v, each ``(h, len_, D)``; None without ``pos_embed``.

        Built once per geometry (view length, dtype, device, weights), not on every denoising step.
        """
        if self.pos_embed is None:
            return None
        projections = (attn.to_q, attn.to_k, attn.to_v)
        key = (len_, x.dtype, x.device, *(weight_key(getattr(p, "weight", x)) for p in projections))
        if key not in self._positions:
            zeros = x.new_zeros(1, len_, x.shape[-1])  # (1, L, C)
            pe = self.pos_embed(zeros).to(x.dtype)  # (1, L, C): the positional term alone
            self._positions = {key: tuple(_heads(_linear_part(p, pe), attn.heads)[0] for p in projections)}
        return self._positions[key]

    def _check_call(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> None:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WindowFusedAttnProcessor handles temporal self-attention without masks only")
        if hidden_states.ndim != 3:
            shape = tuple(hidden_states.shape)
            raise ValueError(f"WindowFusedAttnProcessor expects (B·H·W, F, C) input, got shape {shape}")
        if self.pos_embed is not None and (
            attn.group_norm is not None or attn.spatial_norm is not None or attn.residual_connection
        ):
            raise ValueError(
                "WindowFusedAttnProcessor: pos_embed needs the projections to act directly on the input "
                "(no group_norm/spatial_norm/residual_connection on this Attention)"
            )


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(N, S, h·D) -> (N, h, S, D)``."""
    n, seq, inner = x.shape
    return x.view(n, seq, heads, inner // heads).transpose(1, 2)


def _linear_part(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The bias-free part of an affine projection, ``W·x``. ``(…, C_in) -> (…, C_out)``.

    Plain ``nn.Linear``: ``F.linear`` without bias. Anything else affine (a LoRA-wrapped linear):
    ``proj(x) - proj(0)``.
    """
    if type(proj) is nn.Linear:
        return F.linear(x, proj.weight)
    return proj(x) - proj(torch.zeros_like(x))
