"""FreeNoise window fusion per attention layer (official VideoCrafter FreeNoise, notes §2.2).

Each view of ``window`` frames attends within itself; the views' outputs are weight-averaged per frame
(:mod:`longvid.core.windows`), then ``to_out`` runs once. Installed as a diffusers attention processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longvid.core.processors import StackedQKV, input_norms, plain_linear, qk_norms, weight_key
from longvid.core.windows import FusionPlan, check_window, fusion_plan, window_weights


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
        # bound on the attended views of one chunk of rows (None: see _budget)
        self.chunk_bytes = chunk_bytes
        window_weights(window, weighting)  # validates the scheme name early
        self.window = window
        self.stride = stride
        self.weighting = weighting
        self.pos_embed = pos_embed
        self._positions: dict[tuple, tuple] = {}  # (len, dtype, device, weight versions) -> projected W·pe
        self._weights: tuple = (None, None)  # (plan views, regular count, device, dtype) -> (V, L, 1) weights
        self._qkv = StackedQKV()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        self._check_call(attn, hidden_states, encoder_hidden_states, attention_mask)
        residual = hidden_states
        hidden_states = input_norms(attn, hidden_states, temb)
        n, frames, _ = hidden_states.shape  # (N, F, C)
        plan = fusion_plan(frames, self.window, self.stride, self.weighting)
        if self._uses_matmul_core(attn, hidden_states, plan):
            out = self._matmul_fused_attention(*self._project_for_matmul(attn, hidden_states), plan)  # (N, F, h, D)
        else:
            q, k, v = self._project(attn, hidden_states)  # (N, h, F, D) each, projected once for all frames
            pos = self._projected_positions(attn, hidden_states, len_=plan.views[0][1] - plan.views[0][0])
            if pos is None:  # norms can run once over all frames
                q, k = qk_norms(attn, q, k)
            out = self._fused_attention(attn, q, k, v, plan, pos).transpose(1, 2)  # (N, F, h, D)
        out = out.reshape(n, frames, -1).to(hidden_states.dtype)  # (N, F, h·D)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:  # x / 1.0 == x exactly: skip a full pass over the output
            out = out / attn.rescale_output_factor
        return out

    def _project(self, attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``(N, h, F, D)`` (strided views) from one stacked GEMM when the three widths agree."""
        projections = (attn.to_q, attn.to_k, attn.to_v)
        inner = attn.to_q.out_features
        if any(p.out_features != inner for p in projections):
            return tuple(_heads(p(x), attn.heads) for p in projections)
        n, frames, _ = x.shape
        qkv = self._qkv(attn, x, slice(0, inner)).view(n, frames, 3, attn.heads, -1)  # (N, F, 3, h, D)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))

    def _uses_matmul_core(self, attn, x: torch.Tensor, plan: FusionPlan) -> bool:
        """Whether :meth:`_matmul_fused_attention` runs: on a CPU, without autograd (its products write into
        buffers), for plain q/k/v linears of one width without q/k norms or ``pos_embed``, and when the views
        tile the rows (``stride`` divides ``window`` and ``F``: no tail view). Anything else, and every GPU,
        takes the SDPA path (:meth:`_fused_attention`)."""
        projections = (attn.to_q, attn.to_k, attn.to_v)
        return (x.device.type == "cpu" and not torch.is_grad_enabled() and self.pos_embed is None
                and len(plan.views) > 1 and self.window % self.stride == 0 and x.shape[1] % self.stride == 0
                and attn.norm_q is None and attn.norm_k is None and all(plain_linear(p) for p in projections)
                and len({p.out_features for p in projections}) == 1)

    def _project_for_matmul(self, attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q transposed, ``(h, D, N, F)``, and k, v ``(N, h, F, D)``: strided views of the same three row-major
        GEMMs full attention runs (``AttnProcessor2_0``), so the layer differs from full attention only in its
        core. Measured alternatives, one thread: a stacked
        k/v GEMM and q's own transposed GEMM (``W·Xᵀ``) were 5–15 % slower per projection on an AVX2 CPU than
        three row-major ones, and the core reading q transposed costs ~10 % of one score product."""
        n, frames, _ = x.shape
        # plain linears (checked by _uses_matmul_core): their raw weights give the module's exact product, and q is
        # a fresh tensor no hook or caller holds, so the core may write its output into it
        q, k, v = (F.linear(x, p.weight, p.bias).view(n, frames, attn.heads, -1)
                   for p in (attn.to_q, attn.to_k, attn.to_v))  # (N, F, h, D)
        return q.permute(2, 3, 0, 1), k.transpose(1, 2), v.transpose(1, 2)

    def _fused_attention(self, attn, q, k, v, plan: FusionPlan, pos) -> torch.Tensor:
        """Attention within each view, weight-averaged per frame. q/k/v ``(N, h, F, D)`` -> ``(N, h, F, D)``.

        The regular views start every ``stride`` frames, so they are ``unfold`` views of q/k/v (strided, no
        copy: gathering them copied q, k and v ~``window/stride`` times and took longer than the attention
        itself); a tail view (start off the stride grid) is one more slice. Views go through 4-D SDPA calls
        (the CPU flash kernel; a 5-D batch falls back to the slow math kernel) and the weighted view outputs
        are folded back per frame (:meth:`_fold`). Rows are processed in chunks whose attended views (and, with
        ``pos_embed``, materialised q/k/v views) stay under ``chunk_bytes``.
        """
        if len(plan.views) == 1:  # F ≤ window: plain attention, bit-identical to AttnProcessor2_0
            return self._view_attention(attn, q, k, v, pos)
        n, heads, frames, dim = q.shape
        length, stride = self.window, self.stride
        tail = plan.views[-1] if plan.views[-1][0] % stride else None
        weights = self._view_weights(plan, len(plan.views) - (tail is not None), q.device, q.dtype)  # (V, L, 1)
        # (N, F, h, D) buffer, returned as an (N, h, F, D) view: the caller's transpose back to (N, F, h·D) is free
        out = q.new_empty(n, frames, heads, dim)
        per_row = heads * len(plan.views) * length * dim * q.element_size() * (4 if pos is not None else 1)
        step = max(1, self._budget(q) // max(per_row, 1))
        for r0 in range(0, n, step):
            rows = slice(r0, min(r0 + step, n))
            views = [t[rows].unfold(2, length, stride).transpose(-1, -2) for t in (q, k, v)]  # (n, h, V, L, D)
            dest = out[rows].transpose(1, 2)  # (n, h, F, D) view of the buffer
            if pos is None:  # strided views, one 4-D (n, V, L, D) call per head, read in place by the kernel
                for h in range(heads):
                    attended = F.scaled_dot_product_attention(*(t[:, h] for t in views))  # (n, V, L, D)
                    self._fold(dest[:, h], attended, weights, stride)
            else:
                self._fold(dest, self._attend_with_pos(attn, *views, pos), weights, stride)
            if tail is not None:
                start, end = tail
                views = [t[rows, :, start:end].unsqueeze(2) for t in (q, k, v)]  # (n, h, 1, L, D)
                if pos is None:
                    last = F.scaled_dot_product_attention(*(t[:, :, 0] for t in views))  # (n, h, L, D)
                else:
                    last = self._attend_with_pos(attn, *views, pos)[:, :, 0]
                w = plan.normalized_as(len(plan.views) - 1, q.device, q.dtype)[:, None]  # (L, 1)
                dest[:, :, start:end].addcmul_(last, w)  # zero weight on frames the regular views covered
        return out.transpose(1, 2)

    def _matmul_fused_attention(self, q_t, k, v, plan: FusionPlan) -> torch.Tensor:
        """The views' attention as batched matmuls, weight-averaged per frame. ``q_t`` ``(h, D, N, F)``, k/v
        ``(N, h, F, D)`` -> ``(N, F, h, D)``.

        Why not SDPA: its CPU flash kernel spends ~1.5 µs per 16×16 problem, more than the problem's arithmetic.
        Rows are flattened into one frame axis, so the views of a chunk of rows are one strided ``unfold`` (one
        matmul batch per head, no copies) that also holds ``window/stride - 1`` slots per row whose frames run
        into the next row; their outputs are zeroed (a product by a zero weight would not do: a non-finite value
        in the next row would reach this one). Every slot then has the same shape, and the fold is one sum over
        a strided view of the slots (:func:`_fold_slots`) instead of a weighted add per view part.
        """
        heads, dim, n, frames = q_t.shape
        length, stride = self.window, self.stride
        regular = len(plan.views)  # all views are regular (stride divides window and F)
        slots = frames // stride  # view slots per row: the regular views, then the ones crossing into the next row
        pad = length // stride - 1
        weights = self._view_weights(plan, regular, q_t.device, q_t.dtype).view(regular, 1, length)  # (V, 1, Lq)
        # The output takes q's own storage (row-major (N, F, h, D), see _project_for_matmul): a chunk's fold
        # overwrites q's rows of that chunk, which every head has read by then. No fresh tensor (its first-touch
        # page faults were ~2 % of the layer), and one projection less at the peak.
        out = q_t.permute(2, 3, 0, 1)  # (N, F, h, D)
        step = min(n, max(1, self._budget(q_t) // (heads * slots * length * dim * q_t.element_size())))
        # buffers reused by every chunk (fresh ones per chunk page-faulted on every first write): per head, `pad`
        # zero slots, then the chunk's slots; and one head's scores
        buffer = q_t.new_empty(heads, pad + step * slots, length, dim)  # (h, pad + n·slots, L, D)
        buffer[:, :pad].zero_()
        scores = q_t.new_empty(step * slots, length, length)
        for r0 in range(0, n, step):
            rows = slice(r0, min(r0 + step, n))
            count = rows.stop - rows.start
            attended = buffer[:, :pad + count * slots]
            for h in range(heads):
                dest = attended[h, pad:]  # (n·slots, L, D)
                self._attend_views(q_t[h, :, rows], k[rows, h], v[rows, h], weights, dest, scores)
                dest.view(count, slots, length, dim)[:, regular:].zero_()  # slots that cross rows (and the last pad)
            # every head's fold sums straight into the chunk's contiguous (n·F/S, S, h, D) output: no copy
            _fold_slots(attended, stride, pad, out=out[rows].view(-1, stride, heads, dim))
        return out

    def _attend_views(self, q_t, k, v, weights, dest, scores) -> None:
        """Weighted attention of every view slot of a chunk of rows, for one head, into ``dest``.

        ``q_t`` ``(D, n, F)``, k/v ``(n, F, D)``, ``weights`` ``(V, 1, L)``, ``dest`` ``(n·slots, L, D)``;
        ``scores`` is a buffer of at least ``n·slots`` ``(L, L)`` matrices. Slot ``r·slots + v`` of ``dest`` gets
        ``weights[v] · attention(view v of row r)`` for the regular views ``v`` (the caller zeroes the others).
        Scores are kept transposed, ``(keys, queries)``: the softmax over a non-last axis and the product with a
        transposed probability operand both measured faster than the row-major forms at 16 frames. The view
        weights (one per query) scale the probabilities, ``window`` values per query instead of ``D``."""
        length, stride = self.window, self.stride
        dim, n, frames = q_t.shape
        keys, values = (t.flatten(0, 1).unfold(0, length, stride).transpose(1, 2) for t in (k, v))  # (B, L, D)
        queries = q_t.reshape(dim, n * frames).unfold(1, length, stride).transpose(0, 1)  # (B, D, L)
        scores = scores[:dest.shape[0]]  # (n·slots, Lk, Lq)
        s = scores[:keys.shape[0]]  # the last row's crossing slots have no frames to attend
        torch.baddbmm(s, keys, queries, beta=0, alpha=dim ** -0.5, out=s)  # K Qᵀ / √D
        torch.ops.aten._softmax.out(s, 1, False, out=s)  # over the keys
        regular = weights.shape[0]
        scores.view(n, -1, length, length)[:, :regular].mul_(weights)
        torch.bmm(s.transpose(1, 2), values, out=dest[:keys.shape[0]])  # (B, Lq, D)

    def _budget(self, q: torch.Tensor) -> int:
        # None: 4 MiB on a CPU, where the chunk's views then stay in cache (measured at F = 128/256: a 16 MiB
        # chunk is ~1.3x slower), 256 MiB on a GPU
        return self.chunk_bytes or ((256 << 20) if q.is_cuda else (4 << 20))

    @staticmethod
    def _attend_with_pos(attn, q, k, v, pos) -> torch.Tensor:
        """SDPA within each view with the window-local positional term. q/k/v ``(n, h, V, L, D)`` strided views,
        ``pos`` = projected (pq, pk, pv), each ``(h, L, D)`` -> ``(n, h, V, L, D)``.

        The term makes every view distinct, so q/k/v are materialised once (by the addition itself) and
        attended as one 4-D ``(n·h, V, L, D)`` batch."""
        n, heads, views, length, dim = q.shape
        q, k, v = q + pos[0][:, None], k + pos[1][:, None], v + pos[2][:, None]  # (n, h, V, L, D), contiguous
        q, k = qk_norms(attn, q, k)
        flat = [t.reshape(n * heads, views, length, dim) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*flat).view(n, heads, views, length, dim)

    @staticmethod
    def _fold(dest: torch.Tensor, attended: torch.Tensor, weights: torch.Tensor, stride: int) -> None:
        """``dest[…, s_v + i, :] = Σ_v weights[v, i] · attended[…, v, i, :]`` over the regular views ``s_v = v·stride``;
        frames no regular view covers are zeroed (a tail view adds to them afterwards).

        ``dest`` ``(…, F, D)``, ``attended`` ``(…, V, L, D)``, ``weights`` ``(V, L, 1)``. The weighting is fused
        into the fold (in-place on ``dest``, so autograd still follows it), and the views' outputs are read once. When the window is a
        multiple of the stride, view ``v`` covers stride blocks ``v … v + L/stride - 1``, so the fold is
        ``L/stride`` shifted block writes/additions instead of one per view, and the first one initialises."""
        *_, views, length, _ = attended.shape
        end = (views - 1) * stride + length  # frames the regular views cover
        dest[..., end:, :].zero_()
        if length % stride:
            dest[..., :end, :].zero_()
            for i in range(views):
                dest[..., i * stride:i * stride + length, :].addcmul_(attended[..., i, :, :], weights[i])
            return
        parts = length // stride
        blocks = dest[..., :end, :].unflatten(-2, (end // stride, stride))  # (…, B, S, D)
        shifted = attended.unflatten(-2, (parts, stride))  # (…, V, L/S, S, D)
        w = weights.unflatten(-2, (parts, stride))  # (V, L/S, S, 1)
        blocks[..., :views, :, :].copy_(shifted[..., 0, :, :]).mul_(w[:, 0])  # part 0 of view v is block v
        blocks[..., views:, :, :].zero_()
        for j in range(1, parts):
            blocks[..., j:j + views, :, :].addcmul_(shifted[..., j, :, :], w[:, j])  # block v + j: part j of view v

    def _view_weights(self, plan: FusionPlan, regular: int, device, dtype) -> torch.Tensor:
        """The regular views' normalized weights ``(V, L, 1)`` on ``device``/``dtype``, cached per plan."""
        key = (plan.views, regular, device, dtype)
        if self._weights[0] != key:
            w = torch.stack([plan.normalized_as(i, device, dtype) for i in range(regular)])  # (V, L)
            self._weights = (key, w[:, :, None])
        return self._weights[1]

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


def _fold_slots(attended: torch.Tensor, stride: int, pad: int, out: torch.Tensor) -> torch.Tensor:
    """Per frame block, the sum of the view slots covering it: ``(h, pad + B, L, D) -> out (B, stride, h, D)``,
    the frame-major layout the output projection reads (so no transposing copy).

    Block ``b`` (``stride`` frames) is covered by part ``j`` of slot ``b - j`` for ``j < L/stride``; slot ``u``
    sits at index ``u + pad`` (``pad = L/stride - 1`` zero slots first, so the first blocks read zeros). Part
    ``pad - j'`` of slot ``b - pad + j'`` lies at ``(b + j')·L·D + (pad - j')·stride·D`` past the padded start
    (``pad·stride = L - stride``), i.e. ``(L - stride)·D + b·L·D + j'·(L - stride)·D``: one strided view, and
    the fold is a sum over its ``j'`` axis (read once, written once)."""
    heads, total, length, dim = attended.shape
    blocks = total - pad
    view = attended.as_strided(
        (blocks, pad + 1, stride, heads, dim),  # (B, parts, S, h, D)
        (length * dim, (length - stride) * dim, dim, attended.stride(0), 1),
        attended.storage_offset() + (length - stride) * dim,
    )
    return torch.sum(view, 1, out=out)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(N, S, h·D) -> (N, h, S, D)``."""
    n, seq, inner = x.shape
    return x.view(n, seq, heads, inner // heads).transpose(1, 2)


def _linear_part(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The bias-free part of an affine projection, ``W·x``. ``(…, C_in) -> (…, C_out)``.

    Plain ``nn.Linear``: ``F.linear`` without bias. Anything else affine (a LoRA-wrapped, offloaded or fp8-stored
    linear):
    ``proj(x) - proj(0)``.
    """
    if plain_linear(proj):
        return F.linear(x, proj.weight)
    return proj(x) - proj(torch.zeros_like(x))
