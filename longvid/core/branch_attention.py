"""Attention over disjoint key branches, each with its own rotary positions, merged as one softmax.

FreeLOC's VRPR and TSA (``core/freeloc_geometry.py``) split every query's keys into disjoint *branches*; a branch
rotates q and k with its own temporal positions (re-encoded RoPE) and the branches are merged by their
log-sum-exp weights, which is exactly one softmax over the union of the branches where each key's logit uses
its own branch's rotation. :func:`branch_attention` computes that exactly on any device:

- **blocked** (CPU): a per-geometry *plan* of tasks, each a set of queries, a set of keys and, only where the
  branch's membership predicate (the same pure function the geometry tests check) is not all-true on that
  rectangle, an additive mask. Every task is one fused CPU flash-attention call, which returns its log-sum-exp;
  the tasks' outputs are merged by those per segment of the plan (a few whole-segment ops: per-query maxima,
  weights, two ``index_add_``) and the segments folded as flash attention folds its tiles, so no S × S mask or
  score matrix is ever built and masked-out logits are scored only inside the masked rectangles. The planner
  peels each query group's all-member key columns into an unmasked task (contiguous key runs are slices, not
  gathers) and halves the rest while a cost model says the saved masked logits pay for the extra call; query
  groups are contiguous blocks, or a branch's own tiles (TSA's stripes). q and k are rotated once per distinct
  positions, only over the rows the plan reads. Plans are built once per geometry and kept when they fit
  ``mask_bytes``.
- **flex** (CUDA): one ``flex_attention`` per branch on a block mask, merged by the returned log-sum-exps.

:func:`branch_attention_reference` is the dense float64 statement used by the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Branch:
    """One branch: temporal positions of q and k from frame indices, membership of (m, n) token pairs, and the
    keys a block of queries ``[q0, q1)`` may have in it (a superset; membership decides).

    ``groups`` (optional) replaces the contiguous query blocks for a branch whose keys are not near its queries
    in token order (TSA's raster stripes): it yields ``(queries, candidate keys)`` pairs, the queries a 2-D
    tensor of token indices (a tile: the planner halves it along either axis) that together cover every query
    with a key in the branch, the candidates a superset of each tile's member keys."""

    positions: Callable[[Tensor], tuple[Tensor, Tensor]]
    member: Callable[[Tensor, Tensor], Tensor]
    candidates: Callable[[int, int], Tensor]
    groups: Callable[[], Iterable[tuple[Tensor, Tensor]]] | None = None


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
    its log-sum-exp, compiled on CUDA), ``blocked`` (the exact planned tasks, fused CPU flash attention per task;
    ``block`` = the query block of contiguous groups), ``auto`` = flex on CUDA.
    """
    n_, heads, seq, dim = q.shape
    f, h, w = grid
    frame = torch.arange(seq) // (h * w)  # (S,)
    if backend == "auto":
        backend = "flex" if q.is_cuda else "blocked"
    if backend == "flex":
        pairs = []
        for branch in branches:
            qpos, kpos = branch.positions(frame)
            pairs.append((rotated(q, rotary, qpos, grid), rotated(k, rotary, kpos, grid)))
        return _flex(pairs, v, branches, seq, cache)
    if backend != "blocked":
        raise ValueError(f"backend must be 'auto', 'flex' or 'blocked', got {backend!r}")
    plan = _plan(branches, seq, block, mask_bytes, cache)
    pairs = rotations(q, k, rotary, branches, grid, plan.spans)
    return _run(plan, pairs, v, 1.0 / math.sqrt(dim)).to(v.dtype)


# ------------------------------------------------------------------------------------------- rotations


def rope_tables(rotary, branches: list[Branch], grid: tuple[int, int, int], device=None
                ) -> tuple[bool, list[tuple], list[tuple[int, int]]]:
    """The RoPE tables of every branch's q and k positions, one per distinct positions (VRPR's q and k positions
    coincide across branches; TSA's three original-position branches share one): ``(pairs, tables, index)`` with
    ``tables[i]`` = ``(complex table,)`` when ``pairs`` (``rotary.apply`` is the interleaved-pair rotation, see
    :func:`_is_pair_rotation`) else ``(cos, sin)``, each (1, 1, S, ·), and ``index[b]`` = branch b's (q, k)
    table numbers."""
    f, h, w = grid
    p = h * w
    seq = f * p
    token = torch.arange(seq)
    frame, hpos, wpos = token // p, token // w % h, token % w
    seen: list[Tensor] = []
    tables: list[tuple] = []
    pairs = None

    def number(pos: Tensor) -> int:
        nonlocal pairs
        for i, p0 in enumerate(seen):
            if torch.equal(p0, pos):
                return i
        values, inverse = torch.unique(pos, return_inverse=True)
        rows = None
        if 4 * values.numel() * p <= 3 * seq:  # few temporal values (grouped positions): one row per (value, in-frame
            # position), gathered per token (a token's row depends only on its own three positions)
            cos, sin = rotary.tables(values.repeat_interleave(p), hpos[:p].repeat(values.numel()),
                                     wpos[:p].repeat(values.numel()))
            rows = (inverse * p + token % p).to(device)
        else:
            cos, sin = rotary.tables(pos, hpos, wpos)
        cos, sin = cos.to(device), sin.to(device)
        if pairs is None:
            pairs = _is_pair_rotation(rotary, cos, sin)
        table = (torch.complex(cos[..., 0::2].float(), sin[..., 1::2].float()),) if pairs else (cos, sin)
        if rows is not None:
            table = tuple(t.index_select(-2, rows) for t in table)
        seen.append(pos)
        tables.append(table)
        return len(tables) - 1

    index = [tuple(number(pos) for pos in branch.positions(frame)) for branch in branches]
    return bool(pairs), tables, index


def rotations(q: Tensor, k: Tensor, rotary, branches: list[Branch], grid: tuple[int, int, int],
              spans: list[tuple[tuple[int, int], tuple[int, int]]] | None = None) -> list[tuple[Tensor, Tensor]]:
    """Float32 (rotated q, rotated k) per branch, each (N, heads, S, D) contiguous; one rotation per distinct
    table (TSA rotates q and k three times, not five). With ``spans`` (per branch the [start, stop) token ranges
    of its queries and keys, as a plan records them) only those rows are rotated (TSA's sinks rotate one or a few
    frames of keys, not all of them); the others are left unset, never read."""
    pairs, tables, index = rope_tables(rotary, branches, grid, q.device)
    seq = q.shape[2]
    need: dict[tuple[int, int], tuple[int, int]] = {}  # (q or k, table) -> rows, the union over its branches
    for b, ids in enumerate(index):
        for which, i in enumerate(ids):
            lo, hi = spans[b][which] if spans is not None else (0, seq)
            if hi > lo:
                lo0, hi0 = need.get((which, i), (lo, hi))
                need[which, i] = (min(lo, lo0), max(hi, hi0))
    done: dict[tuple[int, int], Tensor] = {}
    as_complex: dict[int, Tensor] = {}  # q and k as complex pairs (N, heads, S, D/2), made once
    for (which, i), (lo, hi) in need.items():
        x = (q, k)[which]
        if pairs:  # one complex multiply per element: the same products as rotate-pairs' six strided passes
            if which not in as_complex:
                as_complex[which] = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
            r = torch.empty(*x.shape, dtype=torch.float32, device=x.device)
            rows = torch.view_as_complex(r.unflatten(-1, (-1, 2))).narrow(2, lo, hi - lo)
            torch.mul(as_complex[which].narrow(2, lo, hi - lo), tables[i][0].narrow(-2, lo, hi - lo), out=rows)
        else:
            r = rotary.apply(x, *tables[i]).float().contiguous()
        done[which, i] = r
    empty = q.new_empty(0, dtype=torch.float32)  # a branch without queries or keys: nothing reads it
    return [(done.get((0, iq), empty), done.get((1, ik), empty)) for iq, ik in index]


def _is_pair_rotation(rotary, cos: Tensor, sin: Tensor) -> bool:
    """Whether ``rotary.apply(x, cos, sin)`` is Wan's interleaved-pair rotation (``x1·cos − x2·sin, x1·sin +
    x2·cos`` on pairs (2i, 2i+1), cos from even and sin from odd table entries), which one complex multiply by
    ``cos + i·sin`` computes with the same products ~30× faster than its six strided passes. Checked on a sample
    of this call's own table rows; any other rotary keeps its own ``apply``."""
    dim = cos.shape[-1]
    if dim % 2:
        return False
    rows = torch.linspace(0, cos.shape[-2] - 1, min(64, cos.shape[-2])).long().to(cos.device)
    probe = torch.randn(2, 1, rows.numel(), dim, generator=torch.Generator().manual_seed(0)).to(cos.device)
    cs, ss = cos.index_select(-2, rows), sin.index_select(-2, rows)
    table = torch.complex(cs[..., 0::2].float(), ss[..., 1::2].float())
    mine = torch.view_as_real(torch.view_as_complex(probe.unflatten(-1, (-1, 2))) * table).flatten(-2)
    try:
        return torch.allclose(mine, rotary.apply(probe, cs, ss).float(), rtol=1e-5, atol=1e-6)
    except (RuntimeError, TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- blocked path


class Task(NamedTuple):
    """One fused attention call of a plan: ``branch``'s rotation, ``queries``/``keys`` a token slice or an index
    tensor, ``mask`` (Q, K) additive (0 member, −inf not) or None when every pair is a member, ``empty`` (Q,)
    the rows with no member key (None when there are none; the kernel returns log-sum-exp 0 there)."""

    branch: int
    queries: slice | Tensor
    keys: slice | Tensor
    mask: Tensor | None
    empty: Tensor | None


def _take(x: Tensor, sel: slice | Tensor) -> Tensor:
    """``x[:, :, sel]`` of a contiguous (N, h, S, ...) ``x``: a view for a slice, else a gather (of the 3-D view:
    ``index_select`` on dim 2 of the 4-D tensor is ~6× slower on CPU)."""
    if isinstance(sel, slice):
        return x.narrow(2, sel.start, sel.stop - sel.start)
    return x.flatten(0, 1).index_select(1, sel).unflatten(0, x.shape[:2])


# Per-token maxima start here: finite, so a token whose parts are all empty (log-sum-exp −inf) never computes
# −inf − (−inf), and exp(_FLOOR − m) = 0 for any real maximum m.
_FLOOR = -1e30
#: Bytes of task outputs held before they are merged (a segment of the plan; bounds the extra memory).
SEGMENT_BYTES = 8 << 20


def _run(plan: Plan, pairs: list[tuple[Tensor, Tensor]], v: Tensor, scale: float) -> Tensor:
    """Every task as one CPU flash-attention call (normalised output and log-sum-exp); the calls' outputs are
    merged per query by their log-sum-exps in a few whole-segment ops instead of ~10 small ones after each
    call: in a segment of tasks whose outputs fit ``SEGMENT_BYTES``, a part row weighs ``exp(lse − m)`` with
    ``m`` its query's largest log-sum-exp in the segment, and the query's weighted sum and total weight are two
    ``index_add_``; segments fold into the running (sum, weight, max) as flash attention folds its tiles.
    Output = sum / weight (a query no task holds keeps output 0)."""
    n_, heads, seq, dim = v.shape
    vf = v.float().contiguous()
    nh = n_ * heads
    total = torch.zeros(seq, nh, dim, dtype=torch.float32, device=v.device)  # Σ exp(lse − m)·part, token-major
    weight = torch.zeros(seq, nh, dtype=torch.float32, device=v.device)  # Σ exp(lse − m)
    top = torch.full((seq, nh), _FLOOR, dtype=torch.float32, device=v.device)  # m
    for tasks, rows, empty, (lo, hi) in _segments(plan, nh * dim * 4):
        rows, empty = rows.to(v.device), None if empty is None else empty.to(v.device)  # rows: tokens − lo
        part = torch.empty(rows.numel(), nh, dim, dtype=torch.float32, device=v.device)  # one row per (task, query)
        lse = torch.empty(rows.numel(), nh, dtype=torch.float32, device=v.device)
        r = 0
        for task in tasks:
            if v.device.type != "cpu":  # plans live on the CPU
                task = Task(task.branch, *(t.to(v.device) if isinstance(t, Tensor) else t for t in task[1:]))
            qb, kb = pairs[task.branch]
            out, out_lse = _attend(_take(qb, task.queries), _take(kb, task.keys), _take(vf, task.keys), task.mask,
                                   scale)  # (N, h, Q, D), (N, h, Q)
            q = out.shape[2]
            part[r:r + q] = out.flatten(0, 1).transpose(0, 1)
            lse[r:r + q] = out_lse.flatten(0, 1).transpose(0, 1)
            r += q
        if empty is not None:  # the kernel's rows without a key (output 0, log-sum-exp 0): they weigh nothing
            lse.masked_fill_(empty[:, None], float("-inf"))
        span = slice(lo, hi)  # the segment's queries lie in [lo, hi): the folds touch only those tokens
        peak = torch.full((hi - lo, nh), _FLOOR, dtype=torch.float32, device=v.device)
        peak.scatter_reduce_(0, rows[:, None].expand(-1, nh), lse, "amax")  # per query and head
        lse.sub_(peak.index_select(0, rows)).exp_()  # (R, N·h): each part row's weight
        part.mul_(lse.unsqueeze(-1))
        new = torch.maximum(top[span], peak)
        keep, take = top[span].sub_(new).exp_(), peak.sub_(new).exp_()  # top[span] is reset to ``new`` below
        total[span].mul_(keep.unsqueeze(-1)).addcmul_(
            torch.zeros(hi - lo, nh, dim, device=v.device).index_add_(0, rows, part), take.unsqueeze(-1))
        weight[span].mul_(keep).addcmul_(torch.zeros(hi - lo, nh, device=v.device).index_add_(0, rows, lse), take)
        top[span] = new
    out = total.div_(weight.masked_fill_(weight == 0, 1.0).unsqueeze(-1))  # (S, N·h, D)
    return out.transpose(0, 1).reshape(n_, heads, seq, dim)


def _segments(plan: Plan, row_bytes: int) -> list[tuple[list[Task], Tensor, Tensor | None, tuple[int, int]]]:
    """The plan cut into runs of tasks whose output rows (``row_bytes`` each) fit ``SEGMENT_BYTES``: each with
    its rows' query tokens minus the segment's first (R,), the rows' empty flags (R,) (None when none is
    empty) and the token range ``[lo, hi)`` of its queries; kept on the plan per row size."""
    cached = plan.__dict__.setdefault("segments", {})
    limit = max(1, SEGMENT_BYTES // row_bytes)
    if limit in cached:
        return cached[limit]
    every = torch.arange(max((_span([t.queries])[1] for t in plan), default=0))
    out, run, rows, flags = [], [], [], []

    def close():
        tokens = torch.cat(rows)
        lo, hi = int(tokens.min()), int(tokens.max()) + 1
        empty = torch.cat(flags) if any(t.empty is not None for t in run) else None
        out.append((list(run), tokens - lo, empty, (lo, hi)))
        run.clear(), rows.clear(), flags.clear()

    count = 0
    for task in plan:
        q = every[task.queries]
        if run and count + q.numel() > limit:
            close()
            count = 0
        run.append(task)
        rows.append(q)
        flags.append(task.empty if task.empty is not None else torch.zeros(q.numel(), dtype=torch.bool))
        count += q.numel()
    if run:
        close()
    cached[limit] = out
    return out


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """(softmax(q·kᵀ·scale + mask)·v, its log-sum-exp): (N, h, Q, D), (N, h, Q). On the CPU the fused flash
    kernel (never materialises the Q × K scores); elsewhere (the flex path is the GPU's) the plain statement."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    return _attend_math(q, k, v, mask, scale)


def _attend_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    part_lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - part_lse.unsqueeze(-1)).nan_to_num(0.0), v), part_lse


# The planner's cost model, in (query, key) pairs scored, fitted to per-task times on one CPU thread (2 heads × 64,
# 5 % rms): a task costs CALL (the call and its merge), Q × (K + KEY_PAD) pairs (× MASKED with a mask, which the
# kernel adds to every logit), GATHER_KEY per key and GATHER_QUERY per query that is not in one token run (a
# gather, and a scatter for the merge). Groups are not halved below MIN_SPLIT queries. Only speed depends on
# these, never the result. CALL was fitted at 4096 on a CPU whose flash kernel ran ~85 GFLOP/s; on one at ~110
# (AVX-512) a task's ~70 small ops weigh ~16 k pairs, and 16384 took TSA from 0.72x to 0.64x full attention at
# 81 latent frames (VRPR unchanged).
CALL, KEY_PAD, MASKED, GATHER_KEY, GATHER_QUERY, MIN_SPLIT = 16384, 32, 1.13, 6, 45, 8


def _cost(queries: Tensor, keys: Tensor, masked: bool) -> float:
    nq, nk = queries.numel(), keys.numel()
    cost = CALL + nq * (nk + KEY_PAD) * (MASKED if masked else 1.0)
    if not _is_run(keys):
        cost += GATHER_KEY * nk
    if not _is_run(queries.reshape(-1)):
        cost += GATHER_QUERY * nq
    return cost


def _is_run(idx: Tensor) -> bool:
    """Whether ``idx`` is one increasing run of consecutive tokens."""
    return idx.numel() > 0 and int(idx[-1]) - int(idx[0]) + 1 == idx.numel() and bool((idx.diff() == 1).all())


class Plan(list):
    """A plan's tasks, in order, and ``spans``: per branch the [start, stop) token ranges its tasks read of the
    queries and of the keys."""

    spans: list[tuple[tuple[int, int], tuple[int, int]]]


def _plan(branches: list[Branch], seq: int, block: int, mask_bytes: int, cache: dict | None) -> Plan:
    """The tasks of every branch for every query group; cached per geometry when the masks fit ``mask_bytes``."""
    key = ("plan", seq, block, id(branches[0].member) if branches else 0)
    if cache is not None and key in cache:
        return cache[key]
    plan = Plan()
    for q0 in range(0, seq, block):  # contiguous blocks, all their branches together (the merge stays in cache)
        q1 = min(q0 + block, seq)
        queries = torch.arange(q0, q1)[None, :]
        for b, branch in enumerate(branches):
            if branch.groups is None:
                plan += _group_tasks(b, branch, queries, branch.candidates(q0, q1))
    for b, branch in enumerate(branches):
        if branch.groups is not None:
            for queries, keys in branch.groups():
                plan += _group_tasks(b, branch, queries, keys)
    plan[:] = _coalesce(plan)
    plan.spans = [(_span(t.queries for t in plan if t.branch == b), _span(t.keys for t in plan if t.branch == b))
                  for b in range(len(branches))]
    if cache is not None and plan_bytes(plan) <= mask_bytes:
        cache[key] = plan
    return plan


def _coalesce(tasks: list[Task]) -> list[Task]:
    """Unmasked tasks of one branch with the same key run and adjoining query runs as one (TSA's sinks: the same
    frame of keys for most query blocks), in the place of the first."""
    out: list[Task] = []
    last: dict[tuple, int] = {}  # (branch, key run) -> index in ``out`` of the task that may grow
    for task in tasks:
        if task.mask is None and isinstance(task.queries, slice) and isinstance(task.keys, slice):
            key = (task.branch, task.keys.start, task.keys.stop)
            i = last.get(key)
            if i is not None and out[i].queries.stop == task.queries.start:
                out[i] = out[i]._replace(queries=slice(out[i].queries.start, task.queries.stop))
                continue
            last[key] = len(out)
        out.append(task)
    return out


def _span(sels: Iterable[slice | Tensor]) -> tuple[int, int]:
    """The [start, stop) token range covering slices and index tensors ((0, 0) for none)."""
    lo, hi = None, 0
    for sel in sels:
        a, b = (sel.start, sel.stop) if isinstance(sel, slice) else (int(sel.min()), int(sel.max()) + 1)
        lo, hi = a if lo is None else min(lo, a), max(hi, b)
    return (0, 0) if lo is None else (lo, hi)


def plan_bytes(plan: list[Task]) -> int:
    """Bytes a plan holds (masks, index tensors, empty-row flags)."""
    return sum(t.element_size() * t.numel() for task in plan for t in task[1:] if isinstance(t, Tensor))


def branch_cost(member: Callable[[Tensor, Tensor], Tensor], queries: Tensor, keys: Tensor) -> float:
    """The planner's estimated cost of one query group (its cheapest tasks), in scored pairs: lets a branch
    choose the shape of its own groups (TSA's stripe tiles) by the same cost model."""
    if queries.numel() == 0 or keys.numel() == 0:
        return 0.0
    mask = member(queries.reshape(-1)[:, None], keys[None, :]).reshape(*queries.shape, keys.numel())
    return _best(queries, keys, mask)[0]


def _group_tasks(b: int, branch: Branch, queries: Tensor, keys: Tensor) -> list[Task]:
    if queries.numel() == 0 or keys.numel() == 0:
        return []
    mask = branch.member(queries.reshape(-1)[:, None], keys[None, :]).reshape(*queries.shape, keys.numel())
    return [_task(b, *t) for t in _best(queries, keys, mask)[1]]


def _best(queries: Tensor, keys: Tensor, mask: Tensor) -> tuple[float, list[tuple[Tensor, Tensor, Tensor | None]]]:
    """The cheapest tasks for a query tile (A, B) with candidate keys (K,) and membership (A, B, K): one masked
    call, or the all-member key columns unmasked plus the rest (one masked call, or the tile halved)."""
    flat = mask.reshape(-1, mask.shape[-1])
    used = flat.any(0)
    if not used.any():
        return 0.0, []
    if not used.all():
        keys, mask, flat = keys[used], mask[..., used], flat[:, used]
    full = flat.all(0)
    if full.all():
        return _cost(queries, keys, False), [(queries, keys, None)]
    if not full.any():
        return _partial(queries, keys, mask)
    part_cost, part_tasks = _partial(queries, keys[~full], mask[..., ~full])
    peeled = _cost(queries, keys[full], False) + part_cost
    whole = _cost(queries, keys, True)
    if whole <= peeled:
        return whole, [(queries, keys, mask)]
    return peeled, [(queries, keys[full], None), *part_tasks]


def _partial(queries: Tensor, keys: Tensor, mask: Tensor) -> tuple[float, list]:
    """Keys no column of which every query has: one masked call, or the tile halved (along the axis whose halves
    use fewer key columns in all) when that is cheaper."""
    whole = _cost(queries, keys, True)
    if queries.numel() < 2 * MIN_SPLIT:
        return whole, [(queries, keys, mask)]
    halves = []
    for axis in (0, 1):
        n = queries.shape[axis]
        if n >= 2:
            cuts = ((0, n // 2), (n // 2, n - n // 2))
            parts = [(queries.narrow(axis, a, b), mask.narrow(axis, a, b)) for a, b in cuts]
            scored = sum(part.numel() // part.shape[-1] * int(part.flatten(0, 1).any(0).sum()) for _, part in parts)
            halves.append((scored, parts))
    if not halves:
        return whole, [(queries, keys, mask)]
    (lo_q, lo_m), (hi_q, hi_m) = min(halves, key=lambda h: h[0])[1]
    lo, hi = _best(lo_q, keys, lo_m), _best(hi_q, keys, hi_m)
    if lo[0] + hi[0] < whole:
        return lo[0] + hi[0], lo[1] + hi[1]
    return whole, [(queries, keys, mask)]


def _task(b: int, queries: Tensor, keys: Tensor, mask: Tensor | None) -> Task:
    flat = queries.reshape(-1)
    empty = None
    additive = None
    if mask is not None:
        mask = mask.reshape(flat.numel(), keys.numel())
        rows = mask.any(1)
        empty = None if rows.all() else ~rows
        additive = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    return Task(b, _as_slice(flat), _as_slice(keys), additive, empty)


def _as_slice(idx: Tensor) -> slice | Tensor:
    """A slice when ``idx`` is one increasing run of tokens, else the (contiguous) indices."""
    if _is_run(idx):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx.contiguous()


# ------------------------------------------------------------------------------------------- flex path

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
