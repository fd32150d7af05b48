"""GPU kernel choices for FreeNoise and FreeLong, measured side by side: one command on a lent device.

    python scripts/gpu/kernels.py [--tiny] [--rounds N] [--sections windows,block,freelong] [--out FILE.json]

On the CPU longvid keeps its exact paths (chosen by the CPU benchmarks in ``scripts/bench``); on a GPU the
defaults (SDPA's own backend choice, 256 MiB row chunks, one SDPA call per block of query frames) were set
without a device. This script times every candidate GPU path of those kernels on the same inputs at real
sizes, round-robin (CUDA synchronised, median of ``--rounds``), with each candidate's peak memory above its
inputs (``torch.cuda.max_memory_allocated``, reset per candidate, caches it builds included) and its max |Δ|
against the current default; a candidate that fails or is not close to the default (``torch.allclose``, bfloat16:
rtol = atol = 2e-2) cannot win. It changes nothing in longvid: the winners go into ``docs/benchmarks.md`` and the
defaults are then set from them.

Sections (bfloat16 on CUDA; ``--tiny``: float32 toy sizes on whatever device is there, so the test suite keeps
this script working):

1. ``windows`` — FreeNoise per-layer window fusion (``WindowFusedAttnProcessor``, window 16, stride 4) on an
   AnimateDiff temporal layer (diffusers ``Attention(320, heads=8, dim_head=40)``, rows = B·H·W = 2·64·64 of
   a 512×512 video), F = 64 and 128: row-chunk budgets 64 / 256 (default) / 1024 MiB × SDPA backends
   (default, flash, efficient, cuDNN, math). Full attention (``AttnProcessor2_0``) is timed as the yardstick
   (issue goal: windows no slower than full attention), not as a candidate.
2. ``block`` — FreeNoise block fusion (``apply_block_fusion``, window 16, stride 4, the default) on an
   AnimateDiff motion-module block (diffusers ``BasicTransformerBlock(320, 8 heads × 40)``, two self-attentions,
   sinusoidal positions), same rows and F: row-chunk budgets 64 / 256 (default) / 1024 MiB × SDPA backends; the
   vanilla block over all F frames (positions extended) as the yardstick (issue goal: a step ≤ 1.2× vanilla).
3. ``freelong`` — FreeLong's local branch (``windowed_attention``, the part of ``SpectralBlendAttention`` whose
   GPU form is open) on Wan 2.1 1.3B's full layout at 161 frames (41 latent frames × 1560 tokens, 12 heads ×
   128, window 21 latent frames): query frames per SDPA call 1 (default) / 2 / 4 × backends, and one compiled
   ``flex_attention`` call on a frame-window block mask; the global branch (one full SDPA) as the yardstick.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

# cuDNN last: a CUDA fault in one candidate would end the run, and the others are measured by then
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
REAL = {"rows": 2 * 64 * 64, "channels": 320, "heads": 8, "frames": (64, 128), "budgets_mib": (64, 256, 1024),
        "wan": {"frames": 41, "tokens": 1560, "heads": 12, "dim": 128, "window": 21}, "block_frames": (1, 2, 4)}
TINY = {"rows": 24, "channels": 32, "heads": 2, "frames": (32,), "budgets_mib": (1, 256),
        "wan": {"frames": 11, "tokens": 12, "heads": 2, "dim": 16, "window": 5}, "block_frames": (1, 2)}
# (rtol, atol) against the default's output, as torch.allclose: a bfloat16 step is 2^-7 of a value's scale, and a
# block's output carries its O(1)-O(10) residual stream, so an absolute bound alone would reject any other rounding
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(candidates: dict[str, Callable[[], torch.Tensor]], default: str, rounds: int, device: torch.device,
            dtype: torch.dtype, before_memory: Callable[[], None] | None = None) -> list[dict]:
    """Round-robin timing of every candidate (one untimed warm-up call each: compiles, plans), then one call each
    for peak memory (``before_memory`` first: drops caches the warm-up filled, so the call pays for them) and
    the max |Δ| against ``default``'s output. Rows in candidate order."""
    rows = {name: {"candidate": name, "times_s": []} for name in candidates}
    live = dict(candidates)
    for name, fn in candidates.items():
        try:
            fn()
            _sync(device)
        except Exception as exc:  # an SDPA backend this device lacks, a failed compile: recorded, never a winner
            rows[name]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            del live[name]
    for _ in range(rounds):
        for name, fn in live.items():
            _sync(device)
            tick = time.perf_counter()
            fn()
            _sync(device)
            rows[name]["times_s"].append(time.perf_counter() - tick)
    reference = None
    for name in [default] + [n for n in live if n != default]:
        if name not in live:
            continue
        if before_memory is not None:
            before_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        out = live[name]()
        _sync(device)
        row = rows[name]
        if device.type == "cuda":  # before the float32 copy below
            row["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out = out.float()
        if reference is None:
            reference = out
        rtol, atol = TOLERANCE[dtype]
        row["max_abs_diff"] = float((out - reference).abs().max())
        row["close"] = bool(torch.allclose(out, reference, rtol=rtol, atol=atol))
        row["finite"] = bool(torch.isfinite(out).all())
        row["median_s"] = statistics.median(row["times_s"])
        del out
    for row in rows.values():
        row["ok"] = "error" not in row and row.get("finite", False) and row.get("close", False)
    return list(rows.values())


def _with_backend(backend: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    if BACKENDS[backend] is None:
        return fn

    def run():
        with sdpa_kernel(BACKENDS[backend]):
            return fn()

    return run


def windows_section(size: dict, rounds: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from longvid.core.window_attention import WindowFusedAttnProcessor

    heads = size["heads"]
    attn = Attention(query_dim=size["channels"], heads=heads, dim_head=size["channels"] // heads).to(device, dtype)
    attn.eval()
    results = []
    for frames in size["frames"]:
        x = torch.randn(size["rows"], frames, size["channels"], device=device, dtype=dtype,
                        generator=torch.Generator(device).manual_seed(frames))
        candidates = {}
        for mib in size["budgets_mib"]:
            processor = WindowFusedAttnProcessor(16, 4, chunk_bytes=mib << 20)
            for backend in BACKENDS:
                candidates[f"windows {mib} MiB, {backend}"] = _with_backend(
                    backend, lambda p=processor: p(attn, x))
        full = AttnProcessor2_0()
        candidates["full attention (yardstick)"] = lambda: full(attn, x)
        with torch.inference_mode():
            rows = measure(candidates, "windows 256 MiB, default", rounds, device, dtype)
        yard = next(r for r in rows if r["candidate"].startswith("full"))
        yard["ok"] = False  # another computation: timed for the goal, never a candidate
        results.append({"frames": frames, "rows": rows, **_verdict(rows, "windows 256 MiB, default", yard)})
    return results


def block_section(size: dict, rounds: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from diffusers.models.attention import BasicTransformerBlock

    from longvid.core.block_fusion import apply_block_fusion

    heads, channels = size["heads"], size["channels"]
    torch.manual_seed(0)
    # the sinusoidal table has no weights: one long enough for vanilla; block fusion reads its first 16 rows
    block = BasicTransformerBlock(channels, heads, channels // heads, double_self_attention=True,
                                  positional_embeddings="sinusoidal",
                                  num_positional_embeddings=max(size["frames"])).to(device, dtype).eval()
    fused = copy.deepcopy(block)  # the same weights, with block fusion installed
    hook = apply_block_fusion(fused, 16, 4).hook
    results = []
    for frames in size["frames"]:
        x = torch.randn(size["rows"], frames, channels, device=device, dtype=dtype,
                        generator=torch.Generator(device).manual_seed(frames))

        def run(mib: int) -> torch.Tensor:
            hook.chunk_bytes = mib << 20
            return fused(x)

        candidates = {f"block fusion {mib} MiB, {backend}": _with_backend(backend, lambda mib=mib: run(mib))
                      for mib in size["budgets_mib"] for backend in BACKENDS}
        candidates["vanilla block (yardstick)"] = lambda: block(x)
        with torch.inference_mode():
            rows = measure(candidates, "block fusion 256 MiB, default", rounds, device, dtype)
        yard = next(r for r in rows if r["candidate"].startswith("vanilla"))
        yard["ok"] = False
        results.append({"frames": frames, "rows": rows, **_verdict(rows, "block fusion 256 MiB, default", yard)})
    return results


def freelong_section(size: dict, rounds: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    import torch.nn.functional as F

    from longvid.core.attention import _block_plan, window_bounds, windowed_attention

    wan = size["wan"]
    frames, t = wan["frames"], wan["tokens"]
    seq = frames * t
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, wan["heads"], seq, wan["dim"], device=device, dtype=dtype, generator=g)
               for _ in range(3))
    lo, hi = window_bounds(frames, wan["window"])
    candidates = {}
    for bf in size["block_frames"]:
        for backend in BACKENDS:
            candidates[f"sdpa per {bf} frame(s), {backend}"] = _with_backend(
                backend, lambda bf=bf: windowed_attention(q, k, v, lo, hi, t, bf))
    candidates["flex block mask"] = _flex_window(q, k, v, lo, hi, t)
    candidates["global branch (yardstick)"] = lambda: F.scaled_dot_product_attention(q, k, v)
    default = f"sdpa per {size['block_frames'][0]} frame(s), default"
    with torch.inference_mode():  # the per-block masks are cached per geometry: each memory call builds its own
        rows = measure(candidates, default, rounds, device, dtype, before_memory=_block_plan.cache_clear)
    yard = next(r for r in rows if r["candidate"].startswith("global"))
    yard["ok"] = False
    return [{"frames": frames, "tokens_per_frame": t, "rows": rows, **_verdict(rows, default, yard)}]


def _flex_window(q, k, v, lo, hi, t) -> Callable[[], torch.Tensor]:
    """One ``flex_attention`` call on the frame-window block mask (compiled on CUDA; eager elsewhere)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seq, cuda = q.shape[2], q.is_cuda
    lo_d, hi_d = lo.to(q.device), hi.to(q.device)
    state: dict = {}

    def mask_mod(b, h, q_idx, kv_idx):
        frame = kv_idx // t
        return (frame >= lo_d[q_idx // t]) & (frame < hi_d[q_idx // t])

    def run():
        if not state:  # the warm-up call builds the mask and compiles: not timed
            state["mask"] = create_block_mask(mask_mod, None, None, seq, seq, device=str(q.device), _compile=cuda)
            state["kernel"] = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
        return state["kernel"](q, k, v, block_mask=state["mask"])

    return run


def _verdict(rows: list[dict], default: str, yard: dict) -> dict:
    """The fastest candidate that is exact (ok), its speed-up over the default, and both against the yardstick."""
    ok = [r for r in rows if r["ok"]]
    best = min(ok, key=lambda r: r["median_s"]) if ok else None
    base = next((r for r in rows if r["candidate"] == default and r["ok"]), None)
    out = {"winner": best["candidate"] if best else None, "default": default}
    if best and base:
        out["winner_speedup_vs_default"] = base["median_s"] / best["median_s"]
    if best and "median_s" in yard:
        out["winner_vs_yardstick"] = best["median_s"] / yard["median_s"]
        out["default_vs_yardstick"] = base["median_s"] / yard["median_s"] if base else None
    return out


def table(section: str, result: dict) -> str:
    lines = [f"### {section}, F = {result['frames']}: winner **{result['winner']}**"
             + (f" ({result['winner_speedup_vs_default']:.2f}× the default)" if "winner_speedup_vs_default"
                in result else ""),
             "", "| candidate | median ms | peak extra MiB | max abs Δ vs default | ok |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['candidate']} | – | – | – | {r['error']} |")
            continue
        mem = f"{r['peak_extra_mib']:.0f}" if "peak_extra_mib" in r else "–"
        lines.append(f"| {r['candidate']} | {r['median_s'] * 1e3:.2f} | {mem} | {r['max_abs_diff']:.1e} | "
                     f"{'yes' if r['ok'] else 'no'} |")
    return "\n".join(lines)


SECTIONS = {"windows": windows_section, "block": block_section, "freelong": freelong_section}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="float32 toy sizes on any device (the test suite's run)")
    parser.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds (default 5)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--out", type=Path, help="JSON file (default: $OUT/kernels.json, else ./kernels.json)")
    args = parser.parse_args(argv)
    names = args.sections.split(",")
    if unknown := [n for n in names if n not in SECTIONS]:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (use --tiny for the CPU check)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if device.type == "cpu":
        torch.set_num_threads(1)
        # eager flex on a CPU materialises the scores (it is only checked for exactness there): no advice needed
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    out = args.out or Path(os.environ.get("OUT") or ".") / "kernels.json"
    report = {"mode": "tiny" if args.tiny else "real", "device": str(device), "dtype": str(dtype),
              "torch": torch.__version__, "rounds": args.rounds,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "sections": {}}
    print(f"longvid GPU kernel choices ({report['mode']}) on {report['device_name']}, torch {torch.__version__}",
          flush=True)
    size = TINY if args.tiny else REAL
    for name in names:
        report["sections"][name] = SECTIONS[name](size, args.rounds, device, dtype)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))  # after every section: a killed run keeps what it finished
        for result in report["sections"][name]:
            print("\n" + table(name, result), flush=True)
    missing = [(n, r["frames"]) for n, results in report["sections"].items() for r in results if r["winner"] is None]
    print(f"\n{'NO EXACT CANDIDATE: ' + str(missing) if missing else 'every section has a winner'}; JSON: {out}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
