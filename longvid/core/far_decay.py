"""UltraViCo's attention: positive logits of far token pairs scaled down, exactly, at any grid size.

UltraViCo (Zhao et al., 2025) keeps a length-extrapolated DiT's attention from spreading over frames it never
saw together in training: after RoPE, every pre-softmax logit ``s`` of a **far** pair becomes
``min(s, α·s)`` (positive logits shrink, negative ones stay), so far keys lose weight in proportion to how
strongly they match. With ``F`` tokens per latent frame and ``N`` training latent frames (Wan 2.1: 21):

- far (official, token rule): ``|m − n| > F·N/2`` in flattened (f, h, w) token indices; ``rule="frame"`` uses
  frame distance ``> N // 2`` instead (differs only at two frame distances);
- first-frame rule: queries in frame 0 do not see keys at frames ≥ N (official indices ``m ≤ F`` and
  ``n > N·F``, an off-by-one each; ``first_frame="exact"`` uses ``m < F`` and ``n ≥ N·F``; ``"off"`` drops it);
- K is centred over the sequence first (the official SageAttention kernel's ``smooth_k``; the rule is not
  shift-invariant, so parity needs it).

``F`` and ``N`` come from the real grid and model (the official kernel hard-codes 1560 and 21, i.e. Wan 1.3B
at 480×832). The rule is not an additive bias, so one SDPA call cannot express it: the GPU path is
``flex_attention`` with a ``score_mod`` (exact), the CPU path a GEMM per key region and block of queries with
the rule folded into the far regions' GEMM (exact); both are checked against a dense float64 reference.
:func:`far_mask`, :func:`far_share`, :func:`near_bounds` and :func:`hidden_rectangle` are the geometry alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def half_window(tokens_per_frame: int, train_frames: int) -> int:
    """``W``: a pair is far when ``|m − n| > W`` (token rule; ``> F·N/2`` for integers is ``> ⌊F·N/2⌋``)."""
    return (tokens_per_frame * train_frames) // 2


def far_mask(m: Tensor, n: Tensor, tokens_per_frame: int, train_frames: int, rule: str = "token") -> Tensor:
    """Whether query token ``m`` and key token ``n`` (broadcasting index tensors) are a far pair."""
    if rule == "token":
        return (m - n).abs() > half_window(tokens_per_frame, train_frames)
    if rule == "frame":
        return (m // tokens_per_frame - n // tokens_per_frame).abs() > train_frames // 2
    raise ValueError(f"rule must be 'token' or 'frame', got {rule!r}")


def first_frame_mask(m: Tensor, n: Tensor, tokens_per_frame: int, train_frames: int, mode: str = "official") -> Tensor:
    """Pairs the first-frame rule hides: a query in frame 0 and a key at a frame ≥ N."""
    if mode == "official":
        return (m <= tokens_per_frame) & (n > train_frames * tokens_per_frame)
    if mode == "exact":
        return (m < tokens_per_frame) & (n >= train_frames * tokens_per_frame)
    if mode == "off":
        return torch.zeros(torch.broadcast_shapes(m.shape, n.shape), dtype=torch.bool, device=m.device)
    raise ValueError(f"first_frame must be 'official', 'exact' or 'off', got {mode!r}")


def far_share(tokens: int, tokens_per_frame: int, train_frames: int) -> float:
    """Share of all ``tokens²`` ordered pairs that are far (token rule), in closed form: ``2(S − d)`` pairs have
    distance ``d``, so the count beyond ``W`` is ``(S − W − 1)(S − W)``."""
    w = half_window(tokens_per_frame, train_frames)
    return max(tokens - w - 1, 0) * max(tokens - w, 0) / tokens**2


def _decay(scores: Tensor, m: Tensor, n: Tensor, f: int, nf: int, alpha: float, rule: str, first: str) -> Tensor:
    """The rule on a block of scaled logits ``(..., len(m), len(n))``."""
    far = far_mask(m[:, None], n[None, :], f, nf, rule)
    scores = torch.where(far, torch.minimum(scores, alpha * scores), scores)
    hidden = first_frame_mask(m[:, None], n[None, :], f, nf, first)
    return scores.masked_fill(hidden, float("-inf"))


def far_decay_attention(q: Tensor, k: Tensor, v: Tensor, *, tokens_per_frame: int, train_frames: int,
                        alpha: float = 0.9, rule: str = "token", first_frame: str = "official",
                        center_k: bool = True, backend: str = "auto", chunk_bytes: int | None = None) -> Tensor:
    """UltraViCo attention over ``(B, heads, S, D)`` q/k/v in flattened (f, h, w) order; returns ``(B, heads, S, D)``.

    ``backend``: ``flex`` (``flex_attention`` + ``score_mod``, compiled on CUDA); ``regions`` (exact CPU path: per
    block of query rows, one GEMM per key region, the rule folded into the far regions' GEMM, in-place softmax;
    :func:`_regions`); ``chunked`` (exact blocked attention from differentiable ops, for autograd); ``auto`` =
    flex on CUDA, else regions, or chunked when a gradient is needed. ``chunk_bytes`` bounds the logits held
    at a time (default: 16 MiB for regions — ~250 query rows at 2 heads: the GEMMs' efficiency grows with the
    rows while the block's softmax still runs from cache; measured 8 / 16 / 32 / 64 MiB = 1.32 / 1.26 / 1.28 /
    1.32× full attention at 81 latent frames on an AVX2 CPU — 64 MiB for chunked).
    """
    if center_k:
        k = k - k.mean(dim=2, keepdim=True)  # SageAttention's smooth_k, as the official kernel scores
    if backend == "auto":
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        backend = "flex" if q.is_cuda else ("chunked" if grad else "regions")
    if backend == "flex":
        return _flex(q, k, v, tokens_per_frame, train_frames, alpha, rule, first_frame)
    if backend == "regions":
        return _regions(q, k, v, tokens_per_frame, train_frames, alpha, rule, first_frame, chunk_bytes or 16 << 20)
    if backend != "chunked":
        raise ValueError(f"backend must be 'auto', 'flex', 'regions' or 'chunked', got {backend!r}")
    b, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d)
    out = torch.empty_like(q if q.dtype == v.dtype else v)
    keys = torch.arange(s, device=q.device)
    rows = max(1, (chunk_bytes or 64 << 20) // max(b * h * s * 4, 1))
    for r0 in range(0, s, rows):
        r1 = min(r0 + rows, s)
        scores = torch.matmul(q[:, :, r0:r1].float(), k.float().transpose(-1, -2)) * scale  # (B, h, c, S)
        scores = _decay(scores, keys[r0:r1], keys, tokens_per_frame, train_frames, alpha, rule, first_frame)
        out[:, :, r0:r1] = torch.matmul(scores.softmax(dim=-1), v.float()).to(out.dtype)
    return out


def near_bounds(m: Tensor, tokens_per_frame: int, train_frames: int, rule: str, seq: int) -> tuple[Tensor, Tensor]:
    """The keys near query ``m`` (an index tensor), ``[lo, hi)`` — one interval under either rule, and both ends
    non-decreasing in ``m``, so a block of consecutive queries splits the keys into always-far, mixed and
    always-near intervals."""
    if rule == "token":
        w = half_window(tokens_per_frame, train_frames)
        return (m - w).clamp_min(0), (m + w + 1).clamp_max(seq)
    if rule == "frame":
        frame, half = m // tokens_per_frame, train_frames // 2
        return ((frame - half) * tokens_per_frame).clamp_min(0), ((frame + half + 1) * tokens_per_frame).clamp_max(seq)
    raise ValueError(f"rule must be 'token' or 'frame', got {rule!r}")


def hidden_rectangle(tokens_per_frame: int, train_frames: int, mode: str) -> tuple[int, int]:
    """The first-frame rule (:func:`first_frame_mask`) as a rectangle: queries ``[0, rows)`` hide keys ``[key0, S)``."""
    f, n = tokens_per_frame, train_frames
    if mode == "official":
        return f + 1, n * f + 1
    if mode == "exact":
        return f, n * f
    if mode == "off":
        return 0, 0
    raise ValueError(f"first_frame must be 'official', 'exact' or 'off', got {mode!r}")


def _regions(q, k, v, f: int, nf: int, alpha: float, rule: str, first: str, chunk_bytes: int) -> Tensor:
    """Exact CPU path. Per block of query rows ``[r0, r1)`` (all batches and heads at once) the keys split into
    always-far ``[0, a)``, near-or-mixed ``[a, e)`` and always-far ``[e, S)`` (:func:`near_bounds`). The far
    regions' logits come from ``(α·q)·k`` and one in-place ``leaky_relu(·, 1/α)``, which is ``min(s, α·s)``
    (positive ``α·s`` stays, negative ``α·s`` goes back to ``s``), so the rule costs one cheap pass; only the
    mixed slabs (a block wide under the token rule) take an index mask. Then the first-frame rectangle, an
    in-place softmax and one GEMM with V. A block's logits (``chunk_bytes``) stay small, so the unfused
    softmax's passes run from cache; the out-of-place chunked path makes ~8 passes over memory."""
    b, h, s, d = q.shape
    bh = b * h
    scale = 1.0 / math.sqrt(d)
    qs = (q.float() * scale).reshape(bh, s, d)  # (BH, S, D), pre-scaled: the GEMM yields the logits
    qa = qs * alpha  # (BH, S, D): far logits α·s
    kt = k.float().reshape(bh, s, d).transpose(1, 2).contiguous()  # (BH, D, S)
    vf = v.float().reshape(bh, s, d)  # (BH, S, D)
    out = torch.empty(bh, s, d, dtype=torch.float32, device=q.device)
    rows = max(16, chunk_bytes // (4 * s * bh))  # below ~16 rows the GEMMs lose their efficiency
    flat = torch.empty(bh * min(rows, s) * s, dtype=torch.float32, device=q.device)  # one block's logits
    hide_rows, hide_from = hidden_rectangle(f, nf, first)
    slope = 1.0 / alpha
    heads = list(zip(qs.unbind(0), qa.unbind(0), kt.unbind(0), vf.unbind(0), out.unbind(0)))
    for r0 in range(0, s, rows):
        r1 = min(r0 + rows, s)
        sc = flat[:bh * (r1 - r0) * s].view(bh, r1 - r0, s)  # (BH, c, S), contiguous (the softmax runs in place)
        lo, hi = near_bounds(torch.arange(r0, r1, device=q.device), f, nf, rule, s)  # (c,) each: the block's
        (a, a1), (e0, e) = lo[[0, -1]].tolist(), hi[[0, -1]].tolist()  # near keys; their ends, monotone in m
        far = [(x, y) for x, y in ((0, a), (e, s)) if y > x]  # always-far regions
        for (qsi, qai, kti, _, _), sci in zip(heads, sc):  # 2-D GEMMs write column slices in place (a batched
            torch.mm(qsi[r0:r1], kti[:, a:e], out=sci[:, a:e])  # out= slice would be a copy)
            for x, y in far:
                torch.mm(qai[r0:r1], kti[:, x:y], out=sci[:, x:y])
        for x, y in far:
            F.leaky_relu_(sc[:, :, x:y], slope)
        # mixed slabs [a, a1) and [e0, e) (one when they meet): s + (α − 1)·max(s, 0) where the key is outside
        # the query's own near interval
        for x, y in [(a, e)] if a1 >= e0 else [(a, a1), (e0, e)]:
            if y > x:
                keys = torch.arange(x, y, device=q.device)
                outside = (keys < lo[:, None]) | (keys >= hi[:, None])  # (c, width)
                slab = sc[:, :, x:y]
                slab.addcmul_(slab.clamp(min=0), outside.to(slab.dtype).mul_(alpha - 1))
        if r0 < hide_rows and hide_from < s:
            sc[:, :min(r1, hide_rows) - r0, hide_from:] = float("-inf")
        torch.ops.aten._softmax.out(sc, -1, False, out=sc)  # in place: safe on a contiguous tensor only
        for (_, _, _, vfi, outi), sci in zip(heads, sc):
            torch.mm(sci, vfi, out=outi[r0:r1])
    return out.view(b, h, s, d).to(v.dtype)


_COMPILED = {}


def _flex(q, k, v, f: int, nf: int, alpha: float, rule: str, first: str) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    w = half_window(f, nf)

    def score_mod(score, b, h, qi, ki):
        if rule == "token":
            far = (qi - ki).abs() > w
        else:
            far = (qi // f - ki // f).abs() > nf // 2
        score = torch.where(far, torch.minimum(score, alpha * score), score)
        if first == "official":
            hidden = (qi <= f) & (ki > nf * f)
        elif first == "exact":
            hidden = (qi < f) & (ki >= nf * f)
        else:
            return score
        return torch.where(hidden, -float("inf"), score)

    kernel = flex_attention
    if q.is_cuda:  # eager flex materialises every score; compiled it is a fused kernel
        kernel = _COMPILED.setdefault("flex", torch.compile(flex_attention, dynamic=False))
    return kernel(q, k, v, score_mod=score_mod)


def far_decay_reference(q: Tensor, k: Tensor, v: Tensor, *, tokens_per_frame: int, train_frames: int,
                        alpha: float = 0.9, rule: str = "token", first_frame: str = "official",
                        center_k: bool = True) -> Tensor:
    """Dense float64 reference of :func:`far_decay_attention` (tests only)."""
    q, k, v = q.double(), k.double(), v.double()
    if center_k:
        k = k - k.mean(dim=2, keepdim=True)
    s = q.shape[2]
    idx = torch.arange(s, device=q.device)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = _decay(scores, idx, idx, tokens_per_frame, train_frames, alpha, rule, first_frame)
    return F.softmax(scores, dim=-1) @ v
