"""Attention over disjoint key branches, each with its own rotary positions, merged as one softmax.

FreeLOC's VRPR and TSA (``core/freeloc_geometry.py``) split every query's keys into disjoint *branches*; a branch
rotates q and k with its own temporal positions (re-encoded RoPE) and the branches are merged by their
log-sum-exp weights, which is exactly one softmax over the union of the branches where each key's logit uses
its own branch's rotation. :func:`branch_attention` computes that exactly on any device, query block by query
block: for each branch only the candidate keys it can contain are scored (a contiguous token band, or gathered
raster stripes), the branch's membership predicate (the same pure function the geometry tests check) masks them,
and the blocks' outputs are merged online (running log-sum-exp, as flash attention merges tiles), so no S × S
mask or score matrix is ever built. Masks are built once per geometry and kept when they fit ``mask_bytes``.
:func:`branch_attention_reference` is the dense float64 statement used by the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Branch:
    """One branch: temporal positions of q and k from frame indices, membership of (m, n) token pairs, and the
    keys a block of queries ``[q0, q1)`` may have in it (a superset; membership decides)."""

    positions: Callable[[Tensor], tuple[Tensor, Tensor]]
    member: Callable[[Tensor, Tensor], Tensor]
    candidates: Callable[[int, int], Tensor]


def band(lo: int, hi: int, tokens: int) -> Callable[[int, int], Tensor]:
    """Candidates for keys at token offsets ``n − m`` in ``[lo, hi]`` (clipped to the sequence)."""

    def keys(q0: int, q1: int) -> Tensor:
        start, stop = max(0, q0 + lo), min(tokens, q1 - 1 + hi + 1)
        return torch.arange(start, max(start, stop))

    return keys


def rotated(x: Tensor, rotary, temporal: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """``x`` (N, heads, S, D) rotated with per-token temporal positions ``temporal`` (S,) and raster h, w."""
    f, h, w = grid
    token = torch.arange(f * h * w)
    cos, sin = rotary.tables(temporal, token // w % h, token % w)
    return rotary.apply(x, cos.to(x.device), sin.to(x.device))


def branch_attention(q: Tensor, k: Tensor, v: Tensor, rotary, branches: list[Branch], grid: tuple[int, int, int],
                     block: int = 256, mask_bytes: int = 256 << 20, cache: dict | None = None,
                     backend: str = "auto") -> Tensor:
    """Union softmax over ``branches`` for un-rotated ``q``, ``k`` (N, heads, S, D) on the token ``grid``
    (F, H, W); returns (N, heads, S, D) in ``v``'s dtype. ``cache`` keeps per-geometry plans between calls.

    ``backend``: ``flex`` (one ``flex_attention`` call per branch with a block mask built once per geometry and
    its log-sum-exp, compiled on CUDA), ``blocked`` (the exact query-block loop), ``auto`` = flex on CUDA.
    """
    n_, heads, seq, dim = q.shape
    f, h, w = grid
    frame = torch.arange(seq) // (h * w)  # (S,)
    scale = 1.0 / math.sqrt(dim)
    if backend == "auto":
        backend = "flex" if q.is_cuda else "blocked"
    pairs = []
    for branch in branches:
        qpos, kpos = branch.positions(frame)
        pairs.append((rotated(q, rotary, qpos, grid), rotated(k, rotary, kpos, grid)))
    if backend == "flex":
        return _flex(pairs, v, branches, seq, cache)
    if backend != "blocked":
        raise ValueError(f"backend must be 'auto', 'flex' or 'blocked', got {backend!r}")
    pairs = [(qb.float(), kb.float()) for qb, kb in pairs]
    plan = _plan(branches, seq, block, mask_bytes, cache)
    vf = v.float()
    out = torch.empty(n_, heads, seq, dim, device=q.device, dtype=torch.float32)
    for q0, q1, entries in plan:
        acc = torch.zeros(n_, heads, q1 - q0, dim, device=q.device)
        lse = torch.full((n_, heads, q1 - q0), float("-inf"), device=q.device)
        for b, keys, mask in entries:
            qb, kb = pairs[b]
            keys, mask = keys.to(q.device), mask.to(q.device)
            scores = torch.matmul(qb[:, :, q0:q1], kb[:, :, keys].transpose(-1, -2)) * scale  # (N, h, Bq, K)
            scores = scores.masked_fill(~mask, float("-inf"))
            part_lse = torch.logsumexp(scores, dim=-1)  # (N, h, Bq); -inf where the branch holds no key
            weights = torch.exp(scores - part_lse.unsqueeze(-1)).nan_to_num(0.0)
            part = torch.matmul(weights, vf[:, :, keys])  # (N, h, Bq, D)
            merged = torch.logaddexp(lse, part_lse)
            keep = torch.exp(lse - merged).nan_to_num(0.0).unsqueeze(-1)
            take = torch.exp(part_lse - merged).nan_to_num(0.0).unsqueeze(-1)
            acc, lse = acc * keep + part * take, merged
        out[:, :, q0:q1] = acc
    return out.to(v.dtype)


_COMPILED: dict = {}


def _flex(pairs, v: Tensor, branches: list[Branch], seq: int, cache: dict | None) -> Tensor:
    """One ``flex_attention`` per branch on its block mask, merged by the returned log-sum-exps."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kernel = flex_attention
    if v.is_cuda:  # eager flex materialises the scores; compiled it skips empty blocks in a fused kernel
        kernel = _COMPILED.setdefault("flex", torch.compile(flex_attention, dynamic=False))
    out = lse = None
    for b, ((qb, kb), branch) in enumerate(zip(pairs, branches)):
        key = ("block_mask", seq, b, id(branch.member), str(v.device))
        if cache is None or key not in cache:
            def mask_mod(batch, head, q_idx, kv_idx, member=branch.member):
                return member(q_idx, kv_idx)

            mask = create_block_mask(mask_mod, None, None, seq, seq, device=str(v.device), _compile=v.is_cuda)
            if cache is not None:
                cache[key] = mask
        mask = cache[key] if cache is not None else mask
        part, part_lse = kernel(qb, kb.to(qb.dtype), v.to(qb.dtype), block_mask=mask, return_lse=True)
        part, part_lse = part.float(), part_lse.float()  # (N, h, S, D), (N, h, S); -inf where no key
        if out is None:
            out, lse = torch.where(torch.isinf(part_lse).unsqueeze(-1), 0.0, part), part_lse
            continue
        merged = torch.logaddexp(lse, part_lse)
        keep = torch.exp(lse - merged).nan_to_num(0.0).unsqueeze(-1)
        take = torch.exp(part_lse - merged).nan_to_num(0.0).unsqueeze(-1)
        out, lse = out * keep + part.nan_to_num(0.0) * take, merged
    return out.to(v.dtype)


def _plan(branches, seq, block, mask_bytes, cache):
    """[(q0, q1, [(branch, key indices, mask (Bq, K))])] for every query block; cached per geometry when small."""
    key = ("plan", seq, block, id(branches[0].member) if branches else 0)
    if cache is not None and key in cache:
        return cache[key]
    plan, size = [], 0
    for q0 in range(0, seq, block):
        q1 = min(q0 + block, seq)
        m = torch.arange(q0, q1)
        entries = []
        for b, branch in enumerate(branches):
            keys = branch.candidates(q0, q1)
            if keys.numel() == 0:
                continue
            mask = branch.member(m[:, None], keys[None, :])  # (Bq, K)
            if not mask.any():
                continue
            used = mask.any(0)
            if not used.all():  # trim candidates no query of the block uses
                keys, mask = keys[used], mask[:, used]
            entries.append((b, keys, mask))
            size += mask.numel()
        plan.append((q0, q1, entries))
    if cache is not None and size <= mask_bytes:
        cache[key] = plan
    return plan


def branch_attention_reference(q: Tensor, k: Tensor, v: Tensor, rotary, branches: list[Branch],
                               grid: tuple[int, int, int]) -> Tensor:
    """Dense float64 statement: every (m, n) logit with its branch's rotation, one softmax over the union."""
    seq = q.shape[2]
    frame = torch.arange(seq) // (grid[1] * grid[2])
    idx = torch.arange(seq)
    scores = torch.full((*q.shape[:2], seq, seq), float("-inf"), dtype=torch.float64)
    for branch in branches:
        qpos, kpos = branch.positions(frame)
        qb = rotated(q, rotary, qpos, grid).double()
        kb = rotated(k, rotary, kpos, grid).double()
        member = branch.member(idx[:, None], idx[None, :])
        logits = qb @ kb.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = torch.where(member, logits, scores)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v.double()
