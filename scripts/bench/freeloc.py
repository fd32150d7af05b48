"""FreeLOC's TSA and VRPR layers and UltraViCo's far decay vs full attention: one attention core per layer (CPU).

    .venv/bin/python scripts/bench/freeloc.py [--quick] [--rounds N] [--no-memory] [--no-profile] [--threads N]
                                              [--cpu-time] [--json FILE]

Per layer, the attention core only: q, k, v given, (1, heads, S, D) float32 with S = F·P (F latent frames, P
tokens per frame in raster order on an H×W grid), seeded random values, the same inputs for all four kernels:

* **full**: ``scaled_dot_product_attention`` on q and k rotated with Wan's 3-axis RoPE (``WanRotary.apply``;
  the rotation is timed with it) — the vanilla core;
* **TSA**: ``branch_attention(q, k, v, rotary, tsa_branches(grid, round_to), grid, cache=...)`` (q/k before
  RoPE: the kernel rotates per branch positions), exactly as ``methods.freeloc.FreeLocOp`` calls it (default ``block`` and
  ``mask_bytes``, ``sink_future="auto"``, no gap fix);
* **VRPR**: the same with ``vrpr_branches(grid, vrpr_settings(F), round_to)``;
* **UltraViCo**: ``far_decay_attention(rotated q, rotated k, v, tokens_per_frame=P, train_frames=21)`` (alpha
  0.9, token rule, official first-frame rule, K centred: the CPU ``regions`` path; the rotation is timed with it).

Sizes, scaled down from Wan 2.1 1.3B at 480×832 (P = 30×52 = 1560, 12 heads × 128) to fit a CPU with the same
frame structure: P = 8×13 = 104, 2 heads × 64, F = 41 and 81 (S = 4264 and 8424), so one full-attention core at
F = 81 takes about half a second. Every token band of the geometry is a whole number of frames times P, so it
scales with P; the official 128-token band rounding is scaled too: ``round_to = max(1, round(128·P/1560))``
(9 at P = 104). Not scaled: ``branch_attention``'s query block (256 tokens; 2.5 frames here, 0.16 of a frame at
P = 1560) and its planner's cost model (fitted on this CPU at these sizes), so the plan's tasks differ at P = 1560.

Tables, per F:

1. **Time**: round-robin in this process (``_harness.round_robin``: full, TSA, VRPR, UltraViCo in turn, every
   round), median (min) per call after one untimed warm-up call each (which builds the branch plans); ratios =
   median / full's median. Peak extra memory: each kernel once in a fresh subprocess (``_harness.run_child``),
   RSS high-water mark above the RSS before the call (TSA/VRPR with their plan already built and cached, as
   every call after the first sees it). Densities: **kept** = share of the S² (q, k) pairs the kernel attends to
   (TSA/VRPR: counted exactly from the plan's tasks and masks and checked against the pure geometry — ``tsa_branch``
   counted over every pair, ``vrpr_coverage`` — the run fails if they differ; UltraViCo and full: 1), **scored**
   = logits the kernel computes per S² (every task of the plan scores its query × key rectangle, masked or not;
   summed over branches), and the kept density at Wan's real P = 1560 with 128-token rounding for reference
   (TSA: ``tsa_density`` sampling 2 M pairs; VRPR: ``vrpr_coverage``, exact). GFLOP = 4·heads·S²·D·density (QKᵀ
   and PV) for kept and scored pairs.
2. **Mask build**: the first ``branch_attention`` call of a geometry builds its plan (``_plan``: per query group
   and branch, fused-attention tasks of query and key sets with an additive mask only where membership is not
   all-true) and caches it when it fits ``mask_bytes``; later calls look it up. Columns: the plan build alone
   (``_plan`` without a cache), the first call (empty cache), the cached call's mask work (the plan lookup + the
   RoPE tables ``rope_tables`` rebuilds from the branches' positions on every call; the rotations themselves are
   attention compute and shown apart), each as a share of one denoising step estimated as 30 layers × the
   full-attention core at that F. The plan's size, its tasks and whether it was cached are shown, with the
   plan's size and build time at P = 1560 estimated from its middle query groups (the middle 256-query block's
   tasks × the number of blocks, plus the middle stripe tile's × the number of tiles).
3. **Where the time goes** (largest F): one call of each kernel under ``torch.profiler`` (CPU), self time by
   op; "Python/other" = the call's wall time minus the ops' self time (interpreter, dispatch, profiler).

Numerics: at the smaller F each kernel's output is compared with its dense float64 reference
(``branch_attention_reference``; ``far_decay_reference`` on the rotated q/k; full: a float64 softmax on the
rotated q/k); max |Δ| > 1e-4 fails the run (exit 1), as do a geometry count mismatch and a failed memory run.
Missed goals only print.

Goals (the issue's): at F = 81, **TSA ≤ 0.5×** full attention, **VRPR ≤ 1.3×**, **UltraViCo ≤ 1.3×** (ratios
of medians), and **mask building < 1 % of a step after the first call** (at every F). ``--quick`` (P = 4×6,
3 rounds, memory at F = 81 only) only smoke-tests the path and says its verdicts are not judged.

Threads: one torch thread by default (``--threads``), as the engine benchmark (two threads on the 2-vCPU dev VM
are erratic). ``--cpu-time``: times are this process's CPU seconds (``time.process_time``) instead of wall time
(forces one thread). ``--json FILE`` writes every number. Whole run about 2 min on the 2-vCPU dev VM;
``--quick`` 20-45 s.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import timeit
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import _harness as hb  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed  # noqa: E402

from longvid.core import branch_attention as ba  # noqa: E402
from longvid.core.far_decay import far_decay_attention, far_decay_reference  # noqa: E402
from longvid.core.freeloc_attention import tsa_branches, vrpr_branches  # noqa: E402
from longvid.core.freeloc_geometry import tsa_branch, tsa_density, vrpr_coverage, vrpr_settings  # noqa: E402
from longvid.models.wan import WanRotary  # noqa: E402

IMPLS = ("full", "TSA", "VRPR", "UltraViCo")
WAN_P, WAN_ROUND, WAN_LAYERS = 1560, 128, 30  # Wan 2.1 1.3B at 480×832: tokens per latent frame, band rounding
TRAIN_FRAMES = 21  # Wan's trained length in latent frames (UltraViCo's N)
GOAL_F = 81
GOALS = {"TSA": 0.5, "VRPR": 1.3, "UltraViCo": 1.3}  # layer time / full attention at GOAL_F
MASK_GOAL = 0.01  # cached call's mask building / one denoising step
TOL = 1e-4  # max |Δ| against the float64 references
_SIG = inspect.signature(ba.branch_attention).parameters
BLOCK, MASK_BYTES = _SIG["block"].default, _SIG["mask_bytes"].default  # what FreeLocOp runs with
TIMER = time.perf_counter


@dataclass(frozen=True)
class Sizes:
    h: int
    w: int
    heads: int
    dim: int
    frames: tuple[int, ...]
    rounds: int
    plan_reps: int
    memory_frames: tuple[int, ...]

    @property
    def p(self) -> int:
        return self.h * self.w

    @property
    def round_to(self) -> int:
        return max(1, round(WAN_ROUND * self.p / WAN_P))


FULL = Sizes(h=8, w=13, heads=2, dim=64, frames=(41, 81), rounds=7, plan_reps=3, memory_frames=(41, 81))
QUICK = Sizes(h=4, w=6, heads=2, dim=64, frames=(41, 81), rounds=3, plan_reps=2, memory_frames=(81,))


class Setup:
    """Inputs, rotary, branch lists and plan caches of one frame count."""

    def __init__(self, sizes: Sizes, frames: int, seed: int = 0):
        self.sizes, self.frames = sizes, frames
        self.grid = (frames, sizes.h, sizes.w)
        self.p, self.seq = sizes.p, frames * sizes.p
        rope = WanRotaryPosEmbed(sizes.dim, (1, 1, 1), 1024)
        self.rotary = WanRotary(rope(torch.zeros(1, 1, *self.grid)), rope, self.grid)
        g = torch.Generator().manual_seed(seed + frames)
        self.q, self.k, self.v = (torch.randn(1, sizes.heads, self.seq, sizes.dim, generator=g) for _ in range(3))
        self.branches = {"TSA": tsa_branches(self.grid, sizes.round_to),
                         "VRPR": vrpr_branches(self.grid, vrpr_settings(frames), sizes.round_to)}
        self.caches: dict[str, dict] = {"TSA": {}, "VRPR": {}}

    def impls(self) -> dict:
        q, k, v, rot = self.q, self.k, self.v, self.rotary

        def full():
            return F.scaled_dot_product_attention(rot.apply(q), rot.apply(k), v)

        def branch(name):
            return lambda: ba.branch_attention(q, k, v, rot, self.branches[name], self.grid, cache=self.caches[name])

        def ultravico():
            return far_decay_attention(rot.apply(q), rot.apply(k), v, tokens_per_frame=self.p,
                                       train_frames=TRAIN_FRAMES)

        return {"full": full, "TSA": branch("TSA"), "VRPR": branch("VRPR"), "UltraViCo": ultravico}

    def plan(self, name: str, cache: dict | None):
        return ba._plan(self.branches[name], self.seq, BLOCK, MASK_BYTES, cache)

    def tables(self, name: str) -> None:
        """The per-call geometry work of ``branch_attention`` besides the plan: every branch's positions and the
        RoPE tables of its distinct q and k positions (``rope_tables`` rebuilds them on every call)."""
        ba.rope_tables(self.rotary, self.branches[name], self.grid)

    def rotations(self, name: str) -> None:
        """The per-call RoPE rotations of ``branch_attention`` (q and k per distinct positions, tables included)."""
        ba.rotations(self.q, self.k, self.rotary, self.branches[name], self.grid)


# ============================================================================================ geometry
def plan_stats(plan, seq: int) -> dict:
    """Kept pairs (unmasked entries), scored pairs (every task's rectangle), pairs under a mask, tasks, and bytes
    of a plan."""
    every = torch.arange(seq)
    kept = scored = masked = 0
    for task in plan:
        size = every[task.queries].numel() * every[task.keys].numel()
        scored += size
        if task.mask is None:
            kept += size
        else:
            kept += int((task.mask == 0).sum())
            masked += size
    return {"kept_pairs": kept, "scored_pairs": scored, "masked_pairs": masked, "tasks": len(plan),
            "masked_tasks": sum(task.mask is not None for task in plan), "plan_mb": ba.plan_bytes(plan) / hb.MB}


def real_p_plan(name: str, frames: int) -> dict:
    """The plan at Wan's real size (P = 1560, 128-token rounding), estimated from its middle query groups: the
    middle contiguous block's tasks (all its branches) × the number of blocks, plus for a branch planned in tiles
    (TSA's stripes) the middle tile's × the number of tiles. Bytes and build seconds (``TIMER``)."""
    grid = (frames, 30, 52)
    seq = frames * WAN_P
    branches = tsa_branches(grid, WAN_ROUND) if name == "TSA" else \
        vrpr_branches(grid, vrpr_settings(frames), WAN_ROUND)
    q0 = seq // 2 // BLOCK * BLOCK
    queries = torch.arange(q0, q0 + BLOCK)[None, :]
    blocks = -(-seq // BLOCK)
    t0 = TIMER()
    tasks = [t for b, br in enumerate(branches) if br.groups is None
             for t in ba._group_tasks(b, br, queries, br.candidates(q0, q0 + BLOCK))]
    seconds, nbytes = (TIMER() - t0) * blocks, ba.plan_bytes(tasks) * blocks
    for b, br in enumerate(branches):
        if br.groups is not None:
            tiles = list(br.groups())
            t0 = TIMER()
            tasks = ba._group_tasks(b, br, *tiles[len(tiles) // 2])
            seconds += (TIMER() - t0) * len(tiles)
            nbytes += ba.plan_bytes(tasks) * len(tiles)
    return {"plan_mb": nbytes / hb.MB, "build_s": seconds}


def tsa_pairs_exact(frames: int, p: int, round_to: int, rows: int = 256) -> int:
    """Pairs ``tsa_branch`` (sink_future "auto", as ``tsa_branches``) puts in some branch, counted over all S²."""
    seq = frames * p
    n = torch.arange(seq)
    total = 0
    for r0 in range(0, seq, rows):
        m = torch.arange(r0, min(r0 + rows, seq))
        total += int((tsa_branch(m[:, None], n[None, :], p, frames, round_to) >= 0).sum())
    return total


def geometry(s: Setup) -> dict:
    """Densities of TSA and VRPR on this grid (from the plans, checked against the pure geometry) and at P = 1560."""
    out = {}
    pairs = s.seq**2
    for name in ("TSA", "VRPR"):
        st = plan_stats(s.plan(name, s.caches[name] or None), s.seq)  # the cached plan when there is one
        if name == "TSA":
            exact = tsa_pairs_exact(s.frames, s.p, s.sizes.round_to) / pairs
            real = tsa_density(s.frames, WAN_P, round_to=WAN_ROUND, sink_future="auto")
        else:
            exact = vrpr_coverage(s.frames, s.p, s.sizes.round_to)
            real = vrpr_coverage(s.frames, WAN_P, WAN_ROUND)
        kept = st["kept_pairs"] / pairs
        big = real_p_plan(name, s.frames)
        out[name] = {**st, "kept_density": kept, "scored_density": st["scored_pairs"] / pairs,
                     "masked_density": st["masked_pairs"] / pairs, "geometry_density": exact,
                     "geometry_agrees": abs(kept - exact) < 0.5 / pairs, "real_p_density": real,
                     "real_p_plan_mb_estimate": big["plan_mb"], "real_p_plan_build_s_estimate": big["build_s"]}
    for name in ("full", "UltraViCo"):
        out[name] = {"kept_density": 1.0, "scored_density": 1.0, "real_p_density": 1.0}
    return out


# ============================================================================================ numerics
def references(s: Setup) -> dict:
    """Float64 references of the four kernels on this setup's inputs."""
    rot = s.rotary
    qr, kr = rot.apply(s.q), rot.apply(s.k)
    scores = qr.double() @ kr.double().transpose(-1, -2) / math.sqrt(s.sizes.dim)
    full = torch.softmax(scores, dim=-1) @ s.v.double()
    del scores
    return {"full": full,
            "TSA": ba.branch_attention_reference(s.q, s.k, s.v, rot, s.branches["TSA"], s.grid),
            "VRPR": ba.branch_attention_reference(s.q, s.k, s.v, rot, s.branches["VRPR"], s.grid),
            "UltraViCo": far_decay_reference(qr, kr, s.v, tokens_per_frame=s.p, train_frames=TRAIN_FRAMES)}


# ============================================================================================ mask build
def mask_build(s: Setup, reps: int) -> dict:
    """Plan build (uncached), first call (empty cache), cached lookup, per-call tables, rotations, per kernel."""
    out = {}
    for name in ("TSA", "VRPR"):
        build = []
        for _ in range(reps):
            t0 = TIMER()
            s.plan(name, None)
            build.append(TIMER() - t0)
        cache: dict = {}
        t0 = TIMER()
        ba.branch_attention(s.q, s.k, s.v, s.rotary, s.branches[name], s.grid, cache=cache)
        first = TIMER() - t0
        cached = bool(cache)
        n = 200
        lookup = min(timeit.repeat(lambda nm=name, c=cache: s.plan(nm, c), number=n, repeat=5, timer=TIMER)) / n
        tables = min(timeit.repeat(lambda nm=name: s.tables(nm), number=3, repeat=3, timer=TIMER)) / 3
        rotations = min(timeit.repeat(lambda nm=name: s.rotations(nm), number=1, repeat=3, timer=TIMER))
        out[name] = {"build_s": build, "build_median_s": statistics.median(build), "first_call_s": first,
                     "cached": cached, "lookup_s": lookup, "tables_s": tables,
                     "cached_overhead_s": (lookup + tables) if cached else None, "rotations_s": rotations}
    return out


# ============================================================================================ profile
def profile(impls: dict) -> dict:
    """One call of each kernel under the CPU profiler: self time by op, and what no op accounts for."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    out = {}
    for name, fn in impls.items():
        fn()  # warm
        t0 = time.perf_counter()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            fn()
        wall = time.perf_counter() - t0
        ops = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in p.key_averages()),
                     key=lambda x: -x[1])
        self_total = sum(t for _, t, _ in ops)
        out[name] = {"wall_s": wall, "ops_self_s": self_total, "op_calls": sum(c for _, _, c in ops),
                     "top": [{"op": k, "self_s": t, "calls": c} for k, t, c in ops[:8]]}
    return out


# ============================================================================================ memory
def child_main(sizes: Sizes, impl: str, frames: int) -> None:
    s = Setup(sizes, frames)
    fn = s.impls()[impl]
    extra = {}
    with torch.inference_mode():
        if impl in s.branches:
            s.plan(impl, s.caches[impl])  # the steady state: the plan is built and cached
            extra["plan_cached"] = bool(s.caches[impl])
        peak, seconds, out = hb.peak_extra_bytes(fn)
    print(json.dumps({"peak_mb": peak / hb.MB, "seconds": seconds, "impl": impl, "frames": frames,
                      "out_mb": out.numel() * out.element_size() / hb.MB, **extra}), flush=True)


def memory(sizes: Sizes, frames: int, threads: int, args) -> dict:
    argv = {n: [os.path.abspath(__file__), "--threads", str(threads), "--child", n, str(frames)]
            + (["--quick"] if args.quick else []) + (["--cpu-time"] if args.cpu_time else []) for n in IMPLS}
    with ThreadPoolExecutor(max_workers=2) as pool:  # peak RSS is per process: two at a time on the two cores
        futures = {n: pool.submit(hb.run_child, a, 900) for n, a in argv.items()}
        return {n: f.result() for n, f in futures.items()}


# ============================================================================================ main
def _progress(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:.0f} s] {msg}", file=sys.stderr, flush=True)


def ms(ts) -> str:
    return f"{1e3 * statistics.median(ts):.1f} ({1e3 * min(ts):.1f})"


T0 = time.perf_counter()


def run_case(sizes: Sizes, frames: int, rounds: int, threads: int, args, check: bool, last: bool) -> dict:
    s = Setup(sizes, frames)
    impls = s.impls()
    with torch.inference_mode():
        mb = mask_build(s, sizes.plan_reps)
        _progress(f"F={frames}: mask build " + ", ".join(
            f"{n} build {1e3 * r['build_median_s']:.0f} ms, first call {1e3 * r['first_call_s']:.0f} ms"
            for n, r in mb.items()))
        times, outs = hb.round_robin(impls, rounds=rounds, warmup=True, timer=TIMER) if _takes_timer() else \
            hb.round_robin(impls, rounds=rounds, warmup=True)
        med = {n: statistics.median(ts) for n, ts in times.items()}
        _progress(f"F={frames}: " + ", ".join(f"{n} {ms(ts)} ms" for n, ts in times.items()))
        finite = {n: bool(torch.isfinite(o).all()) for n, o in outs.items()}
        numerics = None
        if check:
            refs = references(s)
            numerics = {n: float((outs[n].double() - refs[n]).abs().max()) for n in IMPLS}
            del refs
            _progress(f"F={frames}: max |Δ| vs float64 " + ", ".join(f"{n} {d:.1e}" for n, d in numerics.items()))
        del outs
        geo = geometry(s)
        prof = profile(impls) if last and not args.no_profile else None
    mem = memory(sizes, frames, threads, args) if frames in sizes.memory_frames and not args.no_memory else {}
    step = WAN_LAYERS * med["full"]
    for r in mb.values():
        r["build_share_of_step"] = r["build_median_s"] / step
        r["first_call_share_of_step"] = r["first_call_s"] / step
        r["cached_share_of_step"] = None if r["cached_overhead_s"] is None else r["cached_overhead_s"] / step
    flop = lambda d: 4 * sizes.heads * s.seq**2 * sizes.dim * d / 1e9  # noqa: E731
    return {"frames": frames, "grid": list(s.grid), "seq": s.seq, "tokens_per_frame": s.p,
            "round_to": sizes.round_to, "heads": sizes.heads, "dim": sizes.dim, "rounds": rounds,
            "times_s": times, "median_s": med, "min_s": {n: min(ts) for n, ts in times.items()},
            "ratio_to_full": {n: med[n] / med["full"] for n in IMPLS},
            "paired_ratio_to_full": {n: statistics.median(a / b for a, b in zip(times[n], times["full"]))
                                     for n in IMPLS},
            "finite": finite, "max_abs_diff": numerics, "geometry": geo,
            "gflop_kept": {n: flop(geo[n]["kept_density"]) for n in IMPLS},
            "gflop_scored": {n: flop(geo[n]["scored_density"]) for n in IMPLS},
            "memory": mem, "peak_mb": {n: mem[n].get("peak_mb") for n in mem},
            "step_estimate_s": step, "mask_build": mb, "profile": prof}


def _takes_timer() -> bool:
    return "timer" in inspect.signature(hb.round_robin).parameters


def time_table(cases: list[dict]) -> str:
    rows = []
    for c in cases:
        for n in IMPLS:
            g = c["geometry"][n]
            mem = c["memory"].get(n, {})
            peak = "–" if not mem else (f"{mem['peak_mb']:.0f}" if "peak_mb" in mem else "failed")
            full_peak = c["memory"].get("full", {}).get("peak_mb")
            rows.append([
                c["frames"], f"{c['seq']}", n, ms(c["times_s"][n]),
                f"**{c['ratio_to_full'][n]:.2f}×**" if n != "full" else "1",
                f"{c['paired_ratio_to_full'][n]:.2f}×" if n != "full" else "1",
                peak, hb.fmt_ratio(mem.get("peak_mb"), full_peak, 2) if n != "full" else ("1" if mem else "–"),
                f"{g['kept_density']:.4f}", f"{g['scored_density']:.4f}", f"{c['gflop_kept'][n]:.2f}",
                f"{c['gflop_scored'][n]:.2f}", f"{g['real_p_density']:.4f}",
                f"{c['gflop_scored'][n] / c['median_s'][n]:.1f}",
                "–" if c["max_abs_diff"] is None else f"{c['max_abs_diff'][n]:.1e}",
            ])
    headers = ["F", "S", "kernel", "ms med (min)", "/ full (medians)", "/ full (paired)", "peak extra MB",
               "mem / full", "kept density", "scored density (Σ branches)", "GFLOP kept", "GFLOP scored",
               f"kept density at P={WAN_P}", "GFLOP/s (scored)", "max |Δ| vs float64"]
    return hb.markdown_table(headers, rows)


def mask_table(cases: list[dict]) -> str:
    rows = []
    for c in cases:
        for n, r in c["mask_build"].items():
            g = c["geometry"][n]
            rows.append([
                c["frames"], n, f"{g['tasks']} ({g['masked_tasks']})",
                f"{g['plan_mb']:.1f}", "yes" if r["cached"] else "**no**",
                f"{1e3 * r['build_median_s']:.1f}", f"{100 * r['build_share_of_step']:.2f} %",
                f"{1e3 * r['first_call_s']:.1f}", f"{100 * r['first_call_share_of_step']:.2f} %",
                f"{1e6 * r['lookup_s']:.1f}", f"{1e3 * r['tables_s']:.2f}",
                "–" if r["cached_overhead_s"] is None else f"{1e3 * r['cached_overhead_s']:.2f}",
                "–" if r["cached_share_of_step"] is None else f"**{100 * r['cached_share_of_step']:.3f} %**",
                f"{1e3 * r['rotations_s']:.1f}", f"{1e3 * c['step_estimate_s']:.0f}",
                f"{g['real_p_plan_mb_estimate'] / 1024:.2f} GB, {g['real_p_plan_build_s_estimate']:.0f} s",
            ])
    headers = ["F", "kernel", "tasks (masked)", "plan MB", "cached", "plan build ms", "build / step",
               "first call ms", "first call / step", "cached lookup µs", "RoPE tables ms (every call)",
               "cached-call mask work ms", "cached mask work / step", "rotations ms (every call)",
               f"step est. ms ({WAN_LAYERS} × full)", f"plan at P={WAN_P} ≈ (size, build)"]
    return hb.markdown_table(headers, rows)


def profile_table(case: dict) -> str:
    rows = []
    for n, r in case["profile"].items():
        total = r["wall_s"]
        top = ", ".join(f"{o['op']} {100 * o['self_s'] / total:.0f} % ({o['calls']})" for o in r["top"][:6])
        other = total - r["ops_self_s"]
        rows.append([n, f"{1e3 * total:.1f}", r["op_calls"], top, f"{100 * other / total:.0f} %"])
    return hb.markdown_table(["kernel", "profiled call ms", "op calls", "self time by op (calls)",
                              "Python/other"], rows)


def goals(cases: list[dict], quick: bool) -> tuple[str, list[dict]]:
    lines, out = ["## Goals"], []
    judged = not quick
    at = next((c for c in cases if c["frames"] == GOAL_F), cases[-1])

    def verdict(met: bool) -> str:
        return f"**{'MET' if met else 'MISSED'}**" if judged else f"{'met' if met else 'missed'} at --quick sizes " \
                                                                  "(not judged)"

    for n, limit in GOALS.items():
        r = at["ratio_to_full"][n]
        met = r <= limit
        how = "" if met else f" (over by {r / limit:.2f}×: needs {1e3 * limit * at['median_s']['full']:.0f} ms, " \
                             f"takes {1e3 * at['median_s'][n]:.0f} ms)"
        lines.append(f"- {n} layer ≤ {limit}× full attention at F = {at['frames']}: {r:.2f}× (median "
                     f"{1e3 * at['median_s'][n]:.0f} ms vs {1e3 * at['median_s']['full']:.0f} ms){how} → "
                     f"{verdict(met)}")
        out.append({"name": f"{n} <= {limit}x full", "value": r, "limit": limit, "met": met, "judged": judged})
    shares = [(c["frames"], n, r["cached_share_of_step"], r["build_share_of_step"], r["cached"])
              for c in cases for n, r in c["mask_build"].items()]
    met = all(sh is not None and sh < MASK_GOAL for _, _, sh, _, _ in shares)
    worst = max((sh if sh is not None else float("inf")) for _, _, sh, _, _ in shares)
    per = ", ".join(f"{n} F={f} {'not cached' if sh is None else f'{100 * sh:.3f} %'} (first call's plan build "
                    f"{100 * b:.1f} %)" for f, n, sh, b, _ in shares)
    lines.append(f"- Mask building < {100 * MASK_GOAL:.0f} % of a step after the first call (plan lookup + per-call "
                 f"RoPE tables, step = {WAN_LAYERS} × full): {per} → {verdict(met)}")
    out.append({"name": "mask building < 1% of a step after the first", "value": worst, "limit": MASK_GOAL,
                "met": met, "judged": judged})
    real = [(c["frames"], n, c["geometry"][n]["real_p_plan_mb_estimate"],
             c["geometry"][n]["real_p_plan_build_s_estimate"]) for c in cases for n in ("TSA", "VRPR")]
    over = [r for r in real if r[2] > MASK_BYTES / hb.MB]
    lines.append(f"- Caveat, at Wan's real P = {WAN_P} (estimated from the middle query groups): the plan would "
                 "take " + ", ".join(f"{n} F={f} ≈ {mb / 1024:.2f} GB (build ≈ {sec:.0f} s)"
                                     for f, n, mb, sec in real)
                 + (f"; above mask_bytes = {MASK_BYTES / hb.MB:.0f} MB ("
                    + ", ".join(f"{n} F={f}" for f, n, _, _ in over)
                    + ") it is never cached, so every call rebuilds it." if over else
                    f", within mask_bytes = {MASK_BYTES / hb.MB:.0f} MB: cached after the first call."))
    return "\n".join(lines), out


def main() -> int:
    global TIMER
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (P = 4×6), 3 rounds (~30 s)")
    p.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 7; --quick 3)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-profile", action="store_true", help="skip the profiler breakdown")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; --cpu-time forces 1)")
    p.add_argument("--cpu-time", action="store_true",
                   help="one torch thread, times are this process's CPU seconds (time.process_time)")
    p.add_argument("--json", metavar="FILE", help="write every number to FILE")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "FRAMES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    threads = hb.set_threads(1 if args.cpu_time else args.threads)
    if args.cpu_time:
        TIMER = time.process_time
    sizes = QUICK if args.quick else FULL
    if args.child:
        child_main(sizes, args.child[0], int(args.child[1]))
        return 0

    load0 = os.getloadavg()
    clock = "CPU time of this process (--cpu-time)" if args.cpu_time else "wall time"
    print(f"# FreeLOC (TSA, VRPR) and UltraViCo attention cores vs full attention{' (--quick)' if args.quick else ''}"
          f" — torch {torch.__version__}, {threads} thread(s), {platform.processor() or platform.machine()}, "
          f"float32, times are {clock}; load average at start {load0[0]:.2f} on {os.cpu_count()} cores\n")
    print(f"Grid per frame {sizes.h}×{sizes.w} = {sizes.p} tokens (Wan 480×832: 30×52 = {WAN_P}), {sizes.heads} "
          f"heads × {sizes.dim}, band rounding round_to = max(1, round(128·{sizes.p}/{WAN_P})) = {sizes.round_to} "
          f"(official 128 at P = {WAN_P}), branch_attention block = {BLOCK} tokens, mask_bytes = "
          f"{MASK_BYTES / hb.MB:.0f} MB; UltraViCo train_frames = {TRAIN_FRAMES}.\n", flush=True)
    cases = []
    smallest = min(sizes.frames)
    for i, frames in enumerate(sizes.frames):
        cases.append(run_case(sizes, frames, args.rounds or sizes.rounds, threads, args, check=frames == smallest,
                              last=i == len(sizes.frames) - 1))
    print("## 1. Time, memory, density per layer (attention core)\n")
    print(f"Round-robin, {cases[0]['rounds']} rounds after one warm-up call each; ratios: median / full's median, "
          f"and the median of the per-round ratios (paired). Peak extra memory: one call in a fresh subprocess "
          f"(TSA/VRPR with their plan cached; the output, {cases[-1]['seq'] * sizes.heads * sizes.dim * 4 / hb.MB:.1f}"
          f" MB at F = {cases[-1]['frames']}, included). Kept density: pairs attended / S²; scored: logits "
          f"computed / S² (every task's query × key rectangle, masked or not, summed over branches). "
          f"GFLOP = 4·heads·S²·D·density. max |Δ| at F = {smallest} only.\n")
    print(time_table(cases) + "\n")
    print("## 2. Mask (plan) build\n")
    print(f"Plan build = ``_plan`` without a cache (median of {sizes.plan_reps}); first call = ``branch_attention`` "
          f"with an empty cache (plan build + attention); cached-call mask work = the plan lookup + the RoPE "
          f"tables rebuilt every call; rotations (q and k per distinct positions, every call) are attention "
          f"compute, shown for the breakdown. Step estimate = {WAN_LAYERS} layers × the full core's median at that "
          f"F. Plan at P = {WAN_P}: the middle query groups' tasks (size, build time) × the number of groups.\n")
    print(mask_table(cases) + "\n")
    if cases[-1]["profile"]:
        print(f"## 3. Where the time goes at F = {cases[-1]['frames']} (one profiled call each)\n")
        print(profile_table(cases[-1]) + "\n")
    text, goal_list = goals(cases, args.quick)
    print(text)
    failures = []
    for c in cases:
        if c["max_abs_diff"] is not None:
            failures += [f"F={c['frames']} {n}: max |Δ| {d:.2e} > {TOL}" for n, d in c["max_abs_diff"].items()
                         if not d <= TOL]
        failures += [f"F={c['frames']} {n}: output not finite" for n, ok in c["finite"].items() if not ok]
        failures += [f"F={c['frames']} {n}: plan keeps {g['kept_density']:.6f} of pairs, geometry says "
                     f"{g['geometry_density']:.6f}" for n, g in c["geometry"].items()
                     if "geometry_agrees" in g and not g["geometry_agrees"]]
        failures += [f"F={c['frames']} {n}: memory run failed: {r['error']}" for n, r in c["memory"].items()
                     if "error" in r]
    load1 = os.getloadavg()
    wall = time.perf_counter() - T0
    print(f"\nTotal wall time {wall:.0f} s; load average at end {load1[0]:.2f} on {os.cpu_count()} cores.")
    if args.json:
        report = {"quick": args.quick, "cpu_time": args.cpu_time, "threads": threads, "torch": torch.__version__,
                  "sizes": asdict(sizes), "round_to": sizes.round_to, "block": BLOCK, "mask_bytes": MASK_BYTES,
                  "load_average": [load0[0], load1[0]], "wall_s": wall, "cases": cases, "goals": goal_list,
                  "failures": failures}
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)
    if failures:
        print("\nCORRECTNESS FAILURES: " + "; ".join(failures), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
