"""Pyramid Flow's autoregressive loop on a CPU: the cost of a unit as the history grows, and the masked attention.

    .venv/bin/python scripts/bench/pyramid_flow.py [--quick] [--rounds N] [--cpu-time] [--threads N] [--json FILE]

Random-weight miniFLUX DiTs built in the script (diffusers ``FluxTransformer2DModel``, driven by longvid's
``flux_forward``) run ``loop.generate_units`` exactly as the adapter does, CFG on (batch 2), one step per pyramid
stage for every unit (``image_steps = video_steps = (1, 1, 1)``: the per-unit cost is then three forwards), at
256×256 pixels (32×32 latents: 4×4, 8×8 and 16×16 tokens at the three stages) with 16 text tokens:

1. **Per unit**, for a ``tiny`` DiT (2 + 2 blocks, 2 heads × 64) and a ``mid`` one (4 + 8 blocks, 4 heads × 64):
   time of each unit on the clock, the longest token sequence its forwards see (text + history + the current
   latent at stage 2; 256×256 pixels here), the dense boolean mask that sequence needs (B'·L² bytes; the official kernel is SDPA with
   that mask, and there is no KV cache: the same timestep modulates the history, notes §2.1), and the process's
   peak-RSS growth. The history is every earlier latent, so the sequence — and a unit's cost — grows with the unit.
2. **The attention core at the released sizes' longest sequences** (384p at temp 16: 3068 tokens; 768p at temp
   31: 15,488, notes §5.3), 128 T5 tokens of which 32 are real (a typical prompt; the rest is padding):
   **dense** = ``scaled_dot_product_attention`` with the block-causal boolean mask (the official kernel, and what
   longvid ran before), **blocks** = ``attention.block_causal_attention`` (what longvid runs: only the blocks the
   mask keeps), **unmasked** = SDPA without a mask (the full L² work, for scale); round-robin, same q/k/v, per head
   and batch row, plus max |blocks − dense|.

``--quick``: the tiny DiT only, 4 units, the 384p sequence, 2 rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _harness as hb  # noqa: E402

CONFIGS = {"tiny": dict(num_layers=2, num_single_layers=2, num_attention_heads=2),
           "mid": dict(num_layers=4, num_single_layers=8, num_attention_heads=4)}
TEXT, SIZE = 16, 256
#: the released sizes' longest stage-2 sequences (notes §5.3): 384p at unit 15 (temp 16), 768p at unit 30 (temp 31)
REAL = {"384p temp 16": (15, (48, 80)), "768p temp 31": (30, (96, 160))}


def build(name: str):
    from diffusers import FluxTransformer2DModel

    from longvid.models.pyramid_flow.dit_flux import MINIFLUX_CONFIG

    torch.manual_seed(0)
    return FluxTransformer2DModel(**{**MINIFLUX_CONFIG, **CONFIGS[name], "joint_attention_dim": 32,
                                     "pooled_projection_dim": 24}).eval()


def run_units(name: str, units: int, timer) -> dict:
    from longvid.models.pyramid_flow.dit_flux import flux_forward
    from longvid.models.pyramid_flow.loop import TextCondition, UnitSettings, generate_units

    model = build(name)
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, TEXT, dtype=torch.long)
    mask[0, TEXT // 2:] = 0  # the negative prompt is shorter: padded text, as in real runs
    cond = TextCondition(torch.randn(2, TEXT, 32, generator=g), mask, torch.randn(2, 24, generator=g))
    longest: dict[int, int] = {}
    current = [0]

    def dit(clips, text, text_mask, pooled, t):
        tokens = text.shape[1] + sum(c.shape[2] * (c.shape[3] // 2) * (c.shape[4] // 2) for c in clips)
        longest[current[0]] = max(longest.get(current[0], 0), tokens)
        return flux_forward(model, clips, text, text_mask, pooled, t)

    times, rss = [], []
    start = [timer()]

    def on_unit(done: int, capture) -> None:
        now = timer()
        times.append(now - start[0])
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        current[0] = done
        start[0] = timer()

    settings = UnitSettings(image_steps=(1, 1, 1), video_steps=(1, 1, 1), guidance=7.0, video_guidance=5.0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        out = generate_units(dit, lambda u: cond, (1, 16, units, SIZE // 8, SIZE // 8), torch.Generator().manual_seed(0),
                             settings, on_unit=on_unit)
    rows = [{"unit": u, "history": u, "seq": longest[u], "time_s": times[u], "mask_mb": 2 * longest[u] ** 2 / hb.MB,
             "peak_rss_growth_mb": rss[u] - rss0} for u in range(units)]
    params = sum(p.numel() for p in model.parameters())
    return {"config": name, "params": params, "units": units, "rows": rows, "finite": bool(torch.isfinite(out).all())}


def stage2_clips(unit: int, latent_hw: tuple[int, int]) -> list[torch.Tensor]:
    """Shape stand-ins of the clips a stage-2 forward of ``unit`` sees (history by ``history_plan``, then the
    current latent), for a latent frame of ``latent_hw``."""
    from longvid.models.pyramid_flow.pyramid import history_plan

    h, w = latent_hw
    clips = [torch.zeros(1, 1, 1, h >> (2 - level), w >> (2 - level)) for _, level in history_plan(unit, 2)]
    return clips + [torch.zeros(1, 1, 1, h, w)]


def attention_core(label: str, unit: int, latent_hw: tuple[int, int], rounds: int, timer) -> dict:
    """The dense masked SDPA, the block kernel and unmasked SDPA on the real sequence of ``unit`` at stage 2 (1 head
    × 64, batch 1: the cost per head and batch element)."""
    from longvid.models.pyramid_flow.attention import block_causal, block_causal_attention
    from longvid.models.pyramid_flow.sequence import attention_mask

    clips = stage2_clips(unit, latent_hw)
    text = torch.zeros(1, 128, dtype=torch.long)
    text[:, :32] = 1  # 32 real T5 tokens, 96 padded
    mask = attention_mask(text, clips)  # (1, 1, L, L)
    layout = block_causal(text, clips)
    length = mask.shape[-1]
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, length, 64, generator=g) for _ in range(3))
    impls = {"dense": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
             "blocks": lambda: block_causal_attention(q, k, v, layout),
             "unmasked": lambda: F.scaled_dot_product_attention(q, k, v)}
    times, outs = hb.round_robin(impls, rounds=rounds, warmup=True, keep_first=True, timer=timer)
    delta = float((outs["blocks"] - outs["dense"]).abs().max())
    best = {name: min(t) for name, t in times.items()}
    return {"label": label, "unit": unit, "seq": length, "kept_fraction": float(mask.float().mean()),
            "mask_mb": length**2 / hb.MB, "times_s": times, "max_abs_delta": delta,
            "ratio": best["dense"] / best["unmasked"], "speedup": best["dense"] / best["blocks"],
            "blocks_vs_unmasked": best["blocks"] / best["unmasked"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny DiT only, 4 units, 2 rounds (~20 s)")
    p.add_argument("--rounds", type=int, default=None, help="attention-core rounds (default 5; --quick 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; --cpu-time forces 1)")
    p.add_argument("--cpu-time", action="store_true", help="one torch thread, this process's CPU seconds")
    p.add_argument("--json", metavar="FILE", help="write every number to FILE")
    args = p.parse_args()
    threads, timer = hb.cpu_time_mode(args.cpu_time, args.threads)
    rounds = args.rounds or (2 if args.quick else 5)
    configs = ["tiny"] if args.quick else ["tiny", "mid"]
    units = 4 if args.quick else 8
    load0 = os.getloadavg()
    print(f"# Pyramid Flow: the autoregressive loop and its masked attention{' (--quick)' if args.quick else ''} — "
          f"torch {torch.__version__}, {threads} thread(s), float32, times are "
          f"{'CPU time of this process (--cpu-time)' if args.cpu_time else 'wall time'}; load average at start "
          f"{load0[0]:.2f} on {os.cpu_count()} cores\n")
    results = []
    for name in configs:
        result = run_units(name, units, timer)
        results.append(result)
        first = result["rows"][1]["time_s"] if units > 1 else result["rows"][0]["time_s"]
        print(f"## {name} DiT ({result['params'] / 1e6:.2f} M parameters), {units} units at {SIZE}×{SIZE} px, "
              f"one step per stage, CFG\n")
        print(hb.markdown_table(
            ["unit", "history latents", "longest sequence", "time ms", "× unit 1", "dense mask MB (B'·L²)",
             "peak RSS growth MB"],
            [[r["unit"], r["history"], r["seq"], f"{1000 * r['time_s']:.0f}", f"{r['time_s'] / first:.2f}",
              f"{r['mask_mb']:.2f}", f"{r['peak_rss_growth_mb']:.0f}"] for r in result["rows"]]))
        print(f"\nfinite: {result['finite']}\n", flush=True)
    cases = ["384p temp 16"] if args.quick else list(REAL)
    cores = [attention_core(label, *REAL[label], rounds, timer) for label in cases]
    print("## The attention core at the released sizes' longest sequences (stage 2 of the last unit, 128 text "
          "tokens; 1 head × 64, batch 1)\n")
    print(hb.markdown_table(
        ["sequence", "L tokens", "mask keeps", "dense mask MB", "dense min / med ms", "blocks min / med ms",
         "unmasked min / med ms", "dense / blocks", "blocks / unmasked", "dense / unmasked", "max abs Δ"],
        [[c["label"], c["seq"], f"{c['kept_fraction']:.2f}", f"{c['mask_mb']:.0f}"] +
         [" / ".join(f"{1000 * x:.1f}" for x in hb.min_med(c["times_s"][name]))
          for name in ("dense", "blocks", "unmasked")] +
         [f"{c['speedup']:.2f}×", f"{c['blocks_vs_unmasked']:.2f}×", f"{c['ratio']:.2f}×",
          f"{c['max_abs_delta']:.1e}"] for c in cores]))
    print("\nblocks = the kernel longvid runs (text + frame 0 with their own small mask, then every later frame "
          "against a prefix of the keys); it needs no L² mask.")
    hb.write_json(args.json, {"quick": args.quick, "cpu_time": args.cpu_time, "threads": threads, "units": units,
                              "configs": results, "attention": cores, "load_average": load0[0]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
