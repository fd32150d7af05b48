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
``flex_attention`` with a ``score_mod`` (exact), the CPU path exact blocked attention over query chunks; both
are checked against a dense float64 reference. :func:`far_mask` and :func:`far_share` are the geometry alone.
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
                        center_k: bool = True, backend: str = "auto", chunk_bytes: int = 64 << 20) -> Tensor:
    """UltraViCo attention over ``(B, heads, S, D)`` q/k/v in flattened (f, h, w) order; returns ``(B, heads, S, D)``.

    ``backend``: ``flex`` (``flex_attention`` + ``score_mod``, compiled on CUDA), ``chunked`` (exact blocked
    attention, memory ``chunk_bytes`` of logits at a time), ``auto`` = flex on CUDA, chunked elsewhere.
    """
    if center_k:
        k = k - k.mean(dim=2, keepdim=True)  # SageAttention's smooth_k, as the official kernel scores
    if backend == "auto":
        backend = "flex" if q.is_cuda else "chunked"
    if backend == "flex":
        return _flex(q, k, v, tokens_per_frame, train_frames, alpha, rule, first_frame)
    if backend != "chunked":
        raise ValueError(f"backend must be 'auto', 'flex' or 'chunked', got {backend!r}")
    b, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d)
    out = torch.empty_like(q if q.dtype == v.dtype else v)
    keys = torch.arange(s, device=q.device)
    rows = max(1, chunk_bytes // max(b * h * s * 4, 1))
    for r0 in range(0, s, rows):
        r1 = min(r0 + rows, s)
        scores = torch.matmul(q[:, :, r0:r1].float(), k.float().transpose(-1, -2)) * scale  # (B, h, c, S)
        scores = _decay(scores, keys[r0:r1], keys, tokens_per_frame, train_frames, alpha, rule, first_frame)
        out[:, :, r0:r1] = torch.matmul(scores.softmax(dim=-1), v.float()).to(out.dtype)
    return out


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
