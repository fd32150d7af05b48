"""Engine costs on CPU: the new loop + guidance wrapper vs the previous code path, checkpoints, the pixel hand-off.

    .venv/bin/python scripts/bench/engine.py [--quick] [--rounds N] [--threads N] [--json FILE]

Three tables from one run, every model built here with seeded random weights (no downloads):

1. **Per-step overhead of the new loop.** The *old* path is the code before the engine rework (git fcfb87f),
   restated below: ``sampler.sample`` (``scale_model_input``, denoise, ``scheduler.step``, progress callback)
   around the old adapters' ``denoise``, which did guidance inside the adapter (Wan: cond call, uncond call,
   combine; AnimateDiff: one batched [uncond, cond] UNet call, then combine), calling the networks directly.
   The *new* path is the runner's: ``run_stage(StageJob(denoise=guided(adapter, sampler, ctx), ...))`` with the
   ``on_step`` of ``runner._Steps.reporter`` (no checkpoint store: progress only, a no-op progress function),
   so its per-step cost is counted. Both run on the SAME loaded adapter, from the same latents and
   conditioning, each run with a fresh scheduler of the same config (built outside the timed part). Runs
   alternate old/new, then new/old (ABBA, so neither always goes first) after one untimed warm-up run each.
   Columns: median (min) ms per step over the rounds; ``new / old`` = median of the per-round paired ratios
   with its ~95 % confidence interval (binomial order statistics), the ratio of the two medians, and the
   spread of the paired ratios (p25-p75, min-max); ``+µs/step`` the median paired difference;
   ``identical`` = ``torch.equal`` of the final latents (if not, it says so loudly and the script exits 1).
   Models: ``tiny:wan`` and ``tiny:animatediff`` (overhead-dominated steps, the worst case for a relative
   overhead) and a mid-size Wan built in code (``WanTransformer3DModel``, 4 layers of 4 heads x 64, wrapped
   by ``WanAdapter.from_pipeline``) at about 0.1 s per step. A second table repeats the comparison with every
   network forward replaced by a no-op (a named forward hook returning its input): what remains is the loop,
   the adapter and guidance code and ``scheduler.step``, so the difference between the paths (a few µs to a
   few hundred) is measured far above this VM's run-to-run noise (10-25 % on a step) and set against the
   real step time of the same model; it also shows one read of the network's ``dtype`` property, which
   diffusers computes by walking every submodule. **Goal: new / old <= 1.01.**
2. **Checkpoint write and load, Wan 1.3B-sized latents** (1, 16, 21, 60, 104) float32 (81 frames at
   480x832): the state the runner writes - latents, a ``UniPCMultistepScheduler`` with Wan's flow config
   advanced 3 steps on that shape (so its multistep history holds tensors), and the CPU generator's state.
   ``capture`` = ``scheduler_state`` (what ``on_step``'s ``capture()`` does), ``save`` = ``runner._Steps.save``
   (which calls ``CheckpointStore.save``: safetensors + fsync + atomic renames), ``load`` =
   ``CheckpointStore.load()`` plus reading every tensor in full (safetensors maps the file lazily; warm page
   cache; ``cold`` = after ``posix_fadvise(DONTNEED)`` on the files),
   medians over the repetitions into a temporary folder; bytes = what the folder holds after a save.
   **Goal: save and load < 0.5 s each.**
3. **Pixel hand-off peak memory.** ``core.stages.handoff`` (streamed: decode one latent frame, resize, encode,
   next) vs the naive way (decode the whole video, resize the whole video, encode it) on the same latents,
   tiny Wan VAE, a two-stage plan (``plan_stages``). Each variant runs in a fresh subprocess (``_harness``):
   peak RSS during the call minus the RSS after building the model, the input and one small warm-up call.
   Beside it the analytic sizes: one decoded chunk (4 frames) at the target size, the whole decoded video,
   the whole resized video. The tiny VAE's per-chunk working set on CPU is not small (conv3d buffers: a few
   hundred MB at 224x416), and it is the same for both variants; what the hand-off must not hold is the
   videos, so the table is measured at two frame counts: the streamed peak must not grow with the frame
   count by more than one chunk plus its latent-sized buffers (see ``latent_buffers_mb``), while the naive
   one grows by the videos. Sizes 112x208 -> 224x416, about
   half of Wan's 480x832 (the ratio of video bytes to VAE working set depends on the frame count, not on
   the pixel count; the smaller size keeps the run to about two minutes). ``same`` says both produced
   identical latents.
   **Goal: the streamed peak is bounded by one chunk (flat in frames) and below the naive one.**

Threads: one torch thread by default (``--threads``; tests/conftest.py runs the suite so too). On the 2-vCPU
dev VM two threads made the tiny models' steps 50x slower and erratic (OpenMP hand-offs between vCPUs),
which would drown a 1 % overhead in noise. Exit code 1 when a correctness check fails (old and new latents
differ, a checkpoint does not round-trip, a memory subprocess failed); missed goals only print.
``--quick`` (smaller sizes, few rounds, one frame count for the hand-off whose two subprocesses run side by
side) takes about 35 s; the whole run about 4 min.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import _harness as hb  # noqa: E402

OVERHEAD_GOAL = 1.01  # new / old time per step
CHECKPOINT_GOAL_S = 0.5
WAN_13B_LATENT = (1, 16, 21, 60, 104)  # Wan 2.1 1.3B: 81 frames at 480x832
PROMPT, NEGATIVE = "a red fox running through fresh snow", "blurry"


@dataclass(frozen=True)
class Model:
    name: str
    family: str
    frames: int
    height: int
    width: int
    steps: int
    rounds: int


@dataclass(frozen=True)
class Sizes:
    models: tuple[Model, ...]
    ckpt_reps: int
    handoff_base: tuple[int, int]
    handoff_target: tuple[int, int]
    handoff_frames: tuple[int, ...]
    glue_rounds: int = 101


FULL = Sizes(
    models=(Model("tiny:wan", "wan", 9, 32, 48, steps=10, rounds=101),
            Model("tiny:animatediff", "animatediff", 8, 16, 16, steps=10, rounds=41),
            Model("mid-wan", "wan", 17, 128, 128, steps=5, rounds=31)),
    ckpt_reps=9, handoff_base=(112, 208), handoff_target=(224, 416), handoff_frames=(21, 81))
QUICK = Sizes(
    models=(Model("tiny:wan", "wan", 9, 32, 48, steps=4, rounds=5),
            Model("tiny:animatediff", "animatediff", 8, 16, 16, steps=4, rounds=3),
            Model("mid-wan", "wan", 17, 128, 128, steps=2, rounds=3)),
    ckpt_reps=3, handoff_base=(48, 80), handoff_target=(96, 160), handoff_frames=(81,), glue_rounds=21)

MID_LAYERS, MID_HEADS, MID_HEAD_DIM = 4, 4, 64


def recipe_for(model: Model):
    from longvid.recipe.resolve import resolve

    path = "tiny:wan" if model.name == "mid-wan" else model.name  # mid-wan: the load key of the pipeline it wraps
    guidance = 5.0 if model.family == "wan" else 7.5
    return resolve({"model": {"family": model.family, "path": path},
                    "video": {"num_frames": model.frames, "height": model.height, "width": model.width},
                    "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 3,
                    "sampler": {"steps": model.steps, "guidance_scale": guidance, "max_sequence_length": 16},
                    "runtime": {"device": "cpu"}})


# ============================================================================ 1. the old path (git fcfb87f)
@torch.no_grad()
def old_sample(denoise, x, scheduler, timesteps, *, step_kwargs=None, ctx=None, callback=None):
    """fcfb87f ``longvid.core.sampler.sample``: its body verbatim (type hints dropped)."""
    step_kwargs = step_kwargs or {}
    for i, t in enumerate(timesteps):
        if ctx is not None:
            ctx.step, ctx.timestep = i, float(t)
        model_in = scheduler.scale_model_input(x, t)  # identity for flow-matching schedulers
        prediction = denoise(model_in, t)
        x = scheduler.step(prediction, t, x, **step_kwargs, return_dict=False)[0]
        if callback is not None:
            callback(i + 1, len(timesteps), x)
    return x


def old_wan_denoise(adapter, sampler):
    """fcfb87f ``WanAdapter.denoise`` (with ``_expert``): guidance inside the adapter, two network calls."""
    pipe = adapter.pipe

    def _expert(t):
        ratio = pipe.config.boundary_ratio
        if ratio is None or t >= ratio * pipe.scheduler.config.num_train_timesteps:
            return adapter.denoisers[0], float(sampler.guidance_scale)
        g2 = sampler.guidance_scale_2 if sampler.guidance_scale_2 is not None else sampler.guidance_scale
        return pipe.transformer_2, float(g2)

    def denoise(x, t, cond):
        model, guidance = _expert(t)
        model_in = x.to(model.dtype)
        if pipe.config.expand_timesteps:  # TI2V-5B: one timestep per token
            p_t, p_h, p_w = model.config.patch_size
            tokens = (x.shape[2] // p_t) * (x.shape[3] // p_h) * (x.shape[4] // p_w)
            timestep = t.expand(x.shape[0], tokens)
        else:
            timestep = t.expand(x.shape[0])
        pred = model(hidden_states=model_in, timestep=timestep, encoder_hidden_states=cond.positive,
                     return_dict=False)[0]
        if guidance > 1.0 and cond.negative is not None:
            uncond = model(hidden_states=model_in, timestep=timestep, encoder_hidden_states=cond.negative,
                           return_dict=False)[0]
            pred = uncond + guidance * (pred - uncond)
        return pred

    return denoise


def old_animatediff_denoise(adapter, sampler):
    """fcfb87f ``AnimateDiffAdapter.denoise``: batched [uncond, cond] UNet call, then combine."""
    pipe = adapter.pipe
    guidance = float(sampler.guidance_scale)  # the old adapter's ``guidance`` property
    do_cfg = guidance > 1.0

    def denoise(x, t, cond):
        frames = x.shape[2]
        embeds = torch.cat([cond.negative, cond.positive]) if do_cfg else cond.positive  # (2 or 2F, seq, D)
        if cond.positive.shape[0] == 1:  # one embedding per video -> one per frame, (b, f) order as the UNet wants
            embeds = embeds.repeat_interleave(frames, dim=0)
        model_in = torch.cat([x] * 2) if do_cfg else x
        pred = pipe.unet(model_in, t, encoder_hidden_states=embeds).sample
        if do_cfg:
            uncond, text = pred.chunk(2)
            pred = uncond + guidance * (text - uncond)
        return pred

    return denoise


# ============================================================================= 1. old vs new, per step
def build_mid_wan(recipe):
    """A mid-size Wan (WanTransformer3DModel, 4 x (4 heads x 64)) in tiny Wan's pipeline, via from_pipeline."""
    from diffusers import WanTransformer3DModel

    from longvid.models import tiny
    from longvid.models.wan import WanAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        inner = MID_HEADS * MID_HEAD_DIM
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=MID_HEADS,
                                            attention_head_dim=MID_HEAD_DIM, in_channels=16, out_channels=16,
                                            text_dim=32, freq_dim=256, ffn_dim=4 * inner, num_layers=MID_LAYERS,
                                            cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                            rope_max_seq_len=1024)
        pipe = tiny.tiny_wan(transformer=transformer)  # tiny UMT5 (d_model 32) and causal VAE
    return WanAdapter.from_pipeline(pipe, recipe)


def load_model(model: Model, recipe):
    from longvid import runner

    return build_mid_wan(recipe) if model.name == "mid-wan" else runner.load_adapter(recipe)


def interleaved(impls: dict[str, tuple[Callable[[], tuple], Callable[..., Any]]], rounds: int):
    """Round-robin timing as ``_harness.round_robin``, with an untimed setup per run and ABBA order.

    ``impls``: {name: (setup, run)}; ``setup()`` returns the arguments of ``run`` (a fresh scheduler and so on)
    and is not timed. One untimed warm-up run each first. Returns ({name: [seconds]}, {name: first result}).
    """
    for setup, run in impls.values():
        run(*setup())
    names = list(impls)
    times: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, Any] = {}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            setup, run = impls[name]
            args = setup()
            t0 = time.perf_counter()
            out = run(*args)
            times[name].append(time.perf_counter() - t0)
            first.setdefault(name, out)
            del out, args
    return times, first


@contextlib.contextmanager
def null_network(adapter):
    """Every denoiser of ``adapter`` returns its input instead of running (a named ``replace_forward`` hook,
    removed after): what is left of a step is the loop, the guidance glue and ``scheduler.step``."""
    from longvid.core.hooks import replace_forward

    def wan(module, forward, *args, **kwargs):
        return (kwargs["hidden_states"],)

    def unet(module, forward, sample, *args, **kwargs):
        return SimpleNamespace(sample=sample)

    fn = unet if adapter.batched_cfg else wan
    undo = [replace_forward(m, "bench.null_network", fn) for m in adapter.denoisers]
    try:
        yield
    finally:
        for u in undo:
            u()


def overhead_case(model: Model, rounds: int, glue_rounds: int) -> tuple[dict, dict]:
    """Old vs new on one loaded model: end to end, then glue only (networks replaced by a no-op)."""
    from longvid import runner
    from longvid.core.context import GenerationContext
    from longvid.core.guidance import guided
    from longvid.core.sampler import StageJob, run_stage, set_timesteps
    from longvid.recipe.stages import plan_stages

    recipe = recipe_for(model)
    plan = plan_stages(recipe)[0]
    adapter = load_model(model, recipe)
    progress = lambda event, done, total: None  # noqa: E731  a no-op progress function (the CLI's updates a bar)
    steps = runner._Steps(recipe, progress, store=None, stop=None)  # no checkpoint store: progress only
    with torch.no_grad():
        cond = runner.encode(adapter, recipe)
        shape = adapter.latent_shape(plan.num_frames, plan.height, plan.width)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(recipe.seed), dtype=adapter.latent_dtype)
    old_denoise = (old_wan_denoise if model.family == "wan" else old_animatediff_denoise)(adapter, plan.sampler)

    def setup():
        """Per run, untimed: a fresh scheduler, its schedule, generator, context and starting latents."""
        scheduler = adapter.make_scheduler(plan.sampler)
        timesteps = set_timesteps(scheduler, plan.sampler.steps, adapter.device)
        generator = torch.Generator("cpu").manual_seed(recipe.seed)
        ctx = GenerationContext(num_frames=plan.num_frames, height=plan.height, width=plan.width,
                                latent_frames=shape[2], latent_height=shape[3], latent_width=shape[4],
                                total_steps=plan.sampler.steps)
        return adapter.prepare_latents(noise.clone(), scheduler), scheduler, timesteps, generator, ctx

    def run_old(x, scheduler, timesteps, generator, ctx):  # fcfb87f runner.denoise_latents' loop call
        # step_kwargs: fcfb87f's adapter.step_kwargs(scheduler, generator) read the same eta from its recipe
        step = lambda i, n, _: progress("step", i, n)  # noqa: E731
        return old_sample(lambda x_, t_: old_denoise(x_, t_, cond), x, scheduler, timesteps,
                          step_kwargs=adapter.step_kwargs(scheduler, generator, plan.sampler), ctx=ctx, callback=step)

    def run_new(x, scheduler, timesteps, generator, ctx):  # runner._run_stage's loop call (no methods)
        job = StageJob(denoise=guided(adapter, plan.sampler, ctx), cond=cond, latents=x, scheduler=scheduler,
                       timesteps=timesteps, start=plan.start_step, ctx=ctx, generator=generator,
                       step_kwargs=adapter.step_kwargs(scheduler, generator, plan.sampler),
                       on_step=steps.reporter(plan, []), plan=plan)
        return run_stage(job)

    def measure(n_rounds: int, null: bool) -> dict:
        c0, w0 = os.times(), time.perf_counter()
        with torch.no_grad(), adapter.prepared(plan.num_frames), \
                (null_network(adapter) if null else contextlib.nullcontext()):
            times, outs = interleaved({"old": (setup, run_old), "new": (setup, run_new)}, n_rounds)
        c1, w1 = os.times(), time.perf_counter()
        n = plan.sampler.steps
        per_step = {k: [v / n for v in ts] for k, ts in times.items()}
        paired = sorted(b / a for a, b in zip(per_step["old"], per_step["new"]))
        diffs = sorted(b - a for a, b in zip(per_step["old"], per_step["new"]))
        old_med, new_med = statistics.median(per_step["old"]), statistics.median(per_step["new"])
        return {
            "model": model.name + (" (null network)" if null else ""), "family": model.family, "null_network": null,
            "latent_shape": list(shape), "steps": n, "rounds": n_rounds, "calls_per_step": calls, "params_m": params,
            "old_step_s": per_step["old"], "new_step_s": per_step["new"], "old_median_s": old_med,
            "new_median_s": new_med, "ratio": statistics.median(paired), "ratio_ci95": list(median_ci(paired)),
            "ratio_of_medians": new_med / old_med, "ratio_p25": _quartile(paired, 0), "ratio_p75": _quartile(paired, 2),
            "ratio_min": paired[0], "ratio_max": paired[-1], "delta_us_per_step": 1e6 * statistics.median(diffs),
            "delta_us_ci95": [1e6 * v for v in median_ci(diffs)],
            "identical": bool(torch.equal(outs["old"], outs["new"])),
            "max_abs_diff": float((outs["old"] - outs["new"]).abs().max()),
            "finite": bool(torch.isfinite(outs["new"]).all()),
            "cpu_per_wall": (c1.user + c1.system - c0.user - c0.system) / max(w1 - w0, 1e-9),
        }

    params = sum(p.numel() for p in adapter.denoisers[0].parameters()) / 1e6
    calls = 1 if adapter.batched_cfg else 2
    denoiser = adapter.denoisers[0]
    dtype_us = 1e6 * min(timeit.repeat(lambda: denoiser.dtype, number=20, repeat=5)) / 20
    try:
        real, glue = measure(rounds, null=False), measure(glue_rounds, null=True)
        glue["denoiser_dtype_us"] = dtype_us  # diffusers' ModelMixin.dtype walks every submodule
        return real, glue
    finally:
        adapter.close()


def median_ci(sorted_values: list[float]) -> tuple[float, float]:
    """Distribution-free ~95 % confidence interval of the median (binomial order statistics)."""
    n = len(sorted_values)
    k = max(int((n - 1.96 * n ** 0.5) / 2), 0)
    return sorted_values[k], sorted_values[n - 1 - k]


def _quartile(sorted_values: list[float], i: int) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=4, method="inclusive")[i]


def bench_overhead(sizes: Sizes, args) -> tuple[str, list[dict], list[dict]]:
    rows, glue_rows, results, glue = [], [], [], []
    ms = lambda ts: f"{1e3 * statistics.median(ts):.2f} ({1e3 * min(ts):.2f})"  # noqa: E731
    for model in sizes.models:
        r, g = overhead_case(model, args.rounds or model.rounds, sizes.glue_rounds)
        results.append(r)
        glue.append(g)
        rows.append([
            model.name, f"{r['params_m']:.2f}", "×".join(map(str, r["latent_shape"][1:])), r["calls_per_step"],
            f"{r['steps']} × {r['rounds']}", ms(r["old_step_s"]), ms(r["new_step_s"]),
            f"**{r['ratio']:.4f}** [{r['ratio_ci95'][0]:.4f}, {r['ratio_ci95'][1]:.4f}]", f"{r['ratio_of_medians']:.4f}",
            f"{r['ratio_p25']:.3f}–{r['ratio_p75']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f})",
            f"{r['delta_us_per_step']:+.0f}", "yes" if r["identical"] else "**NO — LATENTS DIFFER**",
            f"{r['cpu_per_wall']:.2f}",
        ])
        g["share_of_step"] = g["delta_us_per_step"] / (1e6 * r["old_median_s"])
        glue_rows.append([
            model.name, f"{g['steps']} × {g['rounds']}", f"{1e6 * g['old_median_s']:.0f}",
            f"{1e6 * g['new_median_s']:.0f}",
            f"**{g['delta_us_per_step']:+.1f}** [{g['delta_us_ci95'][0]:+.1f}, {g['delta_us_ci95'][1]:+.1f}]",
            f"{1e3 * r['old_median_s']:.2f}", f"**{100 * g['share_of_step']:+.2f} %**",
            f"{g['denoiser_dtype_us']:.0f}", "yes" if g["identical"] else "**NO**",
        ])
        _progress(f"overhead {model.name}: " + " | ".join(map(str, rows[-1])) + " || glue: " +
                  " | ".join(map(str, glue_rows[-1])))
        for x in (r, g):
            if not x["identical"]:
                print(f"\n!!! {x['model']}: the old and new paths gave DIFFERENT latents (max abs diff "
                      f"{x['max_abs_diff']:.3e}) !!!\n", file=sys.stderr, flush=True)
    headers = ["model", "denoiser M params", "latents (C×F×H×W)", "network calls / step", "steps × rounds",
               "old ms/step med (min)", "new ms/step med (min)", "new / old paired median [95 % CI]",
               "ratio of medians", "paired p25–p75 (min–max)", "+µs / step (paired median)", "identical latents",
               "CPU s / wall s"]
    glue_headers = ["model, networks as no-ops", "steps × rounds", "old µs/step med", "new µs/step med",
                    "new − old µs/step [95 % CI]", "real old ms/step (table above)", "new − old / real step",
                    "denoiser.dtype µs / read", "identical latents"]
    text = "\n".join([
        "## 1. Per-step time: new loop + guidance wrapper vs the previous code path (fcfb87f)",
        "", f"Same adapter, conditioning, starting latents and scheduler config (fresh per run) for both; CFG on "
            f"(Wan 5.0, AnimateDiff 7.5); mid-wan = WanTransformer3DModel {MID_LAYERS} layers × {MID_HEADS} heads "
            f"× {MID_HEAD_DIM}, ffn {4 * MID_HEADS * MID_HEAD_DIM}. Old/new alternate ABBA after one warm-up run "
            f"each; one sample = a run's time / its steps; the ratio is the median of the per-round new/old ratios "
            f"(each pair ran back to back, so slow drifts of the machine cancel).",
        "", hb.markdown_table(headers, rows),
        "", "Glue only: the same two paths on the same adapters with every network forward replaced by a no-op "
            "(a named forward hook returning its input; the adapter code around the call still runs), so a step is "
            "the loop, the adapter/guidance code and scheduler.step: the difference between the paths is measured "
            "well above this machine's noise and set against the real step time of the same model. "
            "denoiser.dtype: one read of the network's ``dtype`` property (diffusers walks every submodule for it), "
            "for reading the glue numbers.",
        "", hb.markdown_table(glue_headers, glue_rows),
    ])
    return text, results, glue


# ========================================================================================= 2. checkpoint
def checkpoint_state(steps_advanced: int = 3):
    """The runner's checkpoint inputs for Wan 1.3B-sized latents: a recipe, its plan, a generator that drew the
    noise, the UniPC scheduler (Wan's flow config) advanced ``steps_advanced`` steps, and the latents."""
    from longvid.core.sampler import set_timesteps
    from longvid.models.tiny import _wan_scheduler
    from longvid.recipe.resolve import resolve
    from longvid.recipe.stages import plan_stages

    recipe = resolve({"model": {"family": "wan", "path": "tiny:wan"},
                      "video": {"num_frames": 81, "height": 480, "width": 832}, "prompt": PROMPT,
                      "negative_prompt": NEGATIVE, "seed": 3, "runtime": {"device": "cpu"}})
    plan = plan_stages(recipe)[0]
    generator = torch.Generator("cpu").manual_seed(recipe.seed)
    x = torch.randn(WAN_13B_LATENT, generator=generator)  # the runner's initial noise comes from this generator
    scheduler = _wan_scheduler()
    timesteps = set_timesteps(scheduler, plan.sampler.steps, torch.device("cpu"))
    preds = torch.Generator().manual_seed(7)
    for i in range(steps_advanced):  # a stand-in prediction: only the scheduler's state matters here
        x = scheduler.step(torch.randn(WAN_13B_LATENT, generator=preds), timesteps[i], x, return_dict=False)[0]
    return recipe, plan, generator, scheduler, x


def bench_checkpoint(sizes: Sizes, args) -> tuple[str, dict]:
    from longvid import runner
    from longvid.core.sampler import LoopState, scheduler_state
    from longvid.io.checkpoint import CheckpointStore, recipe_hash
    from longvid.recipe.resolve import to_dict

    steps_advanced = 3
    recipe, plan, generator, scheduler, x = checkpoint_state(steps_advanced)
    history = sum(1 for m in scheduler.model_outputs if isinstance(m, torch.Tensor))
    latent_bytes = x.numel() * x.element_size()
    folder = Path(tempfile.mkdtemp(prefix="longvid-bench-ckpt-"))
    store = CheckpointStore(folder / ".video.ckpt", recipe_hash(to_dict(recipe)))
    steps = runner._Steps(recipe, None, store=store, stop=None)
    steps.generator = generator
    times: dict[str, list[float]] = {"capture": [], "save": [], "load": [], "load_cold": []}
    nbytes, files, n_tensors, roundtrip = 0, 0, 0, True
    try:
        for _ in range(sizes.ckpt_reps):
            t0 = time.perf_counter()
            tensors, data = scheduler_state(scheduler)  # what on_step's capture() builds (sampler._default_state)
            state = LoopState(steps_advanced, {"latents": x, **tensors}, {"scheduler": data})
            t1 = time.perf_counter()
            steps.save(plan, state, [])  # -> CheckpointStore.save, as on a signal or every n steps
            t2 = time.perf_counter()
            loaded = _load_all(store)
            t3 = time.perf_counter()
            _drop_page_cache(store.folder)
            t4 = time.perf_counter()
            cold = _load_all(store)
            t5 = time.perf_counter()
            for name, dt in (("capture", t1 - t0), ("save", t2 - t1), ("load", t3 - t2), ("load_cold", t5 - t4)):
                times[name].append(dt)
            roundtrip &= (torch.equal(loaded.tensors["loop.latents"], x) and torch.equal(cold.tensors["loop.latents"], x)
                          and torch.equal(loaded.tensors["generator"], generator.get_state())
                          and loaded.data["step"] == steps_advanced)
            n_tensors = len(loaded.tensors)
            del loaded, cold, state, tensors
        written = [p for p in store.folder.iterdir() if p.is_file()]
        nbytes, files = sum(p.stat().st_size for p in written), len(written)
        fs = _filesystem(folder)
    finally:
        store.discard()
        folder.rmdir()
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"latent_shape": list(WAN_13B_LATENT), "latent_bytes": latent_bytes, "bytes_written": nbytes,
           "files": files, "tensors": n_tensors, "scheduler": type(scheduler).__name__, "history_tensors": history,
           "reps": sizes.ckpt_reps, "filesystem": fs, "roundtrip_equal": bool(roundtrip),
           **{f"{k}_s": v for k, v in times.items()}, **{f"{k}_median_s": v for k, v in med.items()}}
    fmt = lambda k: f"{med[k]:.3f} ({min(times[k]):.3f})"  # noqa: E731
    written = f"{nbytes / hb.MB:.1f} ({files} files, {n_tensors} tensors)"
    row = ["×".join(map(str, WAN_13B_LATENT[1:])), f"{latent_bytes / hb.MB:.1f}", written, fmt("capture"),
           f"**{fmt('save')}**", f"**{fmt('load')}**", fmt("load_cold"), f"{(med['capture'] + med['save']):.3f}",
           f"{nbytes / hb.MB / med['save']:.0f}", "yes" if roundtrip else "**NO**"]
    _progress("checkpoint: " + " | ".join(map(str, row)))
    headers = ["latents (C×F×H×W)", "latents MB", "written MB", "capture s med (min)", "save s med (min)",
               "load s med (min)", "load cold s med (min)", "capture + save s", "save MB/s", "round-trip equal"]
    text = "\n".join([
        "## 2. Checkpoint write and load, Wan 1.3B-sized latents (81 frames at 480×832)",
        "", f"State as the runner writes it: latents + {type(scheduler).__name__} (flow shift 3, solver order "
            f"{scheduler.config.solver_order}) after {steps_advanced} steps ({history} history tensors) + the CPU "
            f"generator; {sizes.ckpt_reps} repetitions into a temporary folder on {fs}; save = runner._Steps.save "
            f"(CheckpointStore.save: safetensors, fsync, atomic renames), load = CheckpointStore.load plus reading "
            f"every tensor in full (safetensors maps lazily; warm page cache; cold = the files' pages dropped with "
            f"posix_fadvise first).",
        "", hb.markdown_table(headers, [row]),
    ])
    return text, res


def _load_all(store):
    """``store.load()`` with every tensor read in full: safetensors maps the file lazily, so ``load()`` alone
    returns before reading the data (a resume then reads it on first use)."""
    ckpt = store.load()
    ckpt.tensors = {k: v.clone() for k, v in ckpt.tensors.items()}
    return ckpt


def _drop_page_cache(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _filesystem(path: Path) -> str:
    """``<fstype> (<device>)`` of the mount holding ``path``, from /proc/mounts."""
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if str(path.resolve()).startswith(mnt) and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} ({best[2]})"


# ========================================================================================= 3. hand-off
HANDOFF_VARIANTS = ("streamed", "naive")


def handoff_setup(sizes: Sizes, frames: int):
    from longvid import runner
    from longvid.recipe.resolve import resolve
    from longvid.recipe.stages import plan_stages

    (bh, bw), (h, w) = sizes.handoff_base, sizes.handoff_target
    recipe = resolve({"model": {"family": "wan", "path": "tiny:wan"},
                      "video": {"num_frames": frames, "height": h, "width": w}, "prompt": PROMPT, "seed": 3,
                      "stages": {"base": {"height": bh, "width": bw}, "refine": {"strength": 0.7}},
                      "runtime": {"device": "cpu"}})
    base, refine = plan_stages(recipe)
    assert refine.upsample == "pixel", refine
    adapter = runner.load_adapter(recipe)
    x = torch.randn(adapter.latent_shape(base.num_frames, base.height, base.width),
                    generator=torch.Generator().manual_seed(1))
    return adapter, x, refine, recipe.runtime


def naive_handoff(adapter, x, plan, runtime) -> torch.Tensor:
    """Decode the whole video, resize the whole video, encode it (in the causal VAE's 1 + 4k frame chunks)."""
    from longvid.core.stages import resize_frames

    with torch.no_grad():
        video = torch.cat(list(adapter.decode_stream(x, runtime)), dim=2)  # (1, 3, F, h, w), the whole video
        resized = resize_frames(video, plan.height, plan.width, plan.interpolation)  # (1, 3, F, H, W)
        frames = resized.shape[2]
        chunks = [resized[:, :, :1]] + [resized[:, :, i:i + 4] for i in range(1, frames, 4)]
        return adapter.encode_stream(iter(chunks), runtime)


def handoff_child(sizes: Sizes, variant: str, frames: int) -> None:
    """Fresh process: build the model and the input, one small warm-up call, then measure one call."""
    from longvid.core.stages import handoff

    adapter, x, plan, runtime = handoff_setup(sizes, frames)
    call = (lambda z: handoff(adapter, z, plan, runtime)) if variant == "streamed" else \
        (lambda z: naive_handoff(adapter, z, plan, runtime))
    with torch.no_grad():
        call(x[:, :, :2])  # warm-up (5 frames): kernels and allocator pools, not counted
        base_rss = hb.rss_bytes()
        peak, seconds, out = hb.peak_extra_bytes(lambda: call(x))
    digest = hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()
    print(json.dumps({"peak_mb": peak / hb.MB, "seconds": seconds, "baseline_mb": base_rss / hb.MB, "sha256": digest,
                      "in_shape": list(x.shape), "out_shape": list(out.shape), "variant": variant, "frames": frames}),
          flush=True)


def latent_buffers_mb(child: dict) -> float:
    """Latent-sized buffers a streamed hand-off holds, whose size grows with the frame count: the encoder's
    per-chunk moments, their concatenation and ``quant_conv``'s output (2 × the output latents each), the
    output latents and one temporary of their normalisation (1 each), and the decoder's normalised and
    post-quant copies of the input latents (1 × the input each)."""
    return (6 * math.prod(child["out_shape"]) + 2 * math.prod(child["in_shape"])) * 4 / hb.MB


def bench_handoff(sizes: Sizes, args, threads: int) -> tuple[str, dict]:
    (bh, bw), (h, w) = sizes.handoff_base, sizes.handoff_target
    mb = lambda n: n * 4 / hb.MB  # noqa: E731  float32 elements -> MB
    chunk_mb = mb(4 * 3 * h * w)  # one decoded chunk (4 frames) at the target size
    rows, cases, notes = [], [], []
    for frames in sizes.handoff_frames:
        argv = {v: [os.path.abspath(__file__), "--threads", str(threads), "--child", v, str(frames)]
                + (["--quick"] if args.quick else []) for v in HANDOFF_VARIANTS}
        # --quick: both subprocesses at once (one core each; peak RSS is per process), else one after the other
        with ThreadPoolExecutor(max_workers=len(argv) if args.quick else 1) as pool:
            futures = {v: pool.submit(hb.run_child, a, 900) for v, a in argv.items()}
            res = {v: f.result() for v, f in futures.items()}
        notes += [f"- {frames} frames, {v}: memory run failed: {r['error']}" for v, r in res.items() if "error" in r]
        s, n = res["streamed"], res["naive"]
        ok = "error" not in s and "error" not in n
        case = {"frames": frames, "base": [bh, bw], "target": [h, w], "chunk_mb": chunk_mb,
                "latent_buffers_mb": latent_buffers_mb(s) if ok else None,
                "decoded_mb": mb(frames * 3 * bh * bw), "resized_mb": mb(frames * 3 * h * w),
                "streamed_peak_mb": s.get("peak_mb"), "naive_peak_mb": n.get("peak_mb"),
                "streamed_s": s.get("seconds"), "naive_s": n.get("seconds"),
                "baseline_mb": s.get("baseline_mb"), "same_latents": ok and s["sha256"] == n["sha256"],
                "errors": [r["error"] for r in (s, n) if "error" in r]}
        cases.append(case)
        videos = case["decoded_mb"] + case["resized_mb"]
        rows.append([
            frames, f"{bh}×{bw} → {h}×{w}", f"{chunk_mb:.1f}", _f(case["latent_buffers_mb"], 1),
            f"{case['decoded_mb']:.0f}", f"{case['resized_mb']:.0f}",
            _f(case["streamed_peak_mb"]), _f(case["naive_peak_mb"]),
            _f(case["naive_peak_mb"] - case["streamed_peak_mb"]) if ok else "–", f"{videos:.0f}",
            f"{_f(case['streamed_s'], 1)} / {_f(case['naive_s'], 1)}" + (" (side by side)" if args.quick else ""),
            "yes" if case["same_latents"] else "**NO**",
        ])
        _progress(f"handoff {frames} frames: " + " | ".join(map(str, rows[-1])))
    growth = None
    done = [c for c in cases if not c["errors"]]
    if len(done) >= 2:
        lo, hi = done[0], done[-1]
        growth = {"frames": [lo["frames"], hi["frames"]],
                  "allowance_mb": chunk_mb + hi["latent_buffers_mb"] - lo["latent_buffers_mb"],
                  "streamed_mb": hi["streamed_peak_mb"] - lo["streamed_peak_mb"],
                  "naive_mb": hi["naive_peak_mb"] - lo["naive_peak_mb"],
                  "videos_mb": (hi["decoded_mb"] + hi["resized_mb"]) - (lo["decoded_mb"] + lo["resized_mb"])}
    headers = ["frames", "base → target", "one chunk MB (4 frames at target)", "latent buffers MB", "decoded video MB",
               "resized video MB", "streamed peak extra MB", "naive peak extra MB", "naive − streamed MB",
               "decoded + resized MB", "s streamed / naive", "same latents"]
    lines = []
    if growth:
        lines.append(f"From {growth['frames'][0]} to {growth['frames'][1]} frames the streamed peak grows by "
                     f"{growth['streamed_mb']:+.1f} MB (allowed: one chunk at the target size + the growth of the "
                     f"latent buffers = {growth['allowance_mb']:.1f} MB), the naive one by {growth['naive_mb']:+.1f} MB "
                     f"(the videos grow by {growth['videos_mb']:.1f} MB).")
    text = "\n".join([
        "## 3. Pixel hand-off peak memory: streamed (core.stages.handoff) vs decode all, resize all, encode all",
        "", f"Tiny Wan VAE (causal, 4×8 compression), bilinear resize, float32, each variant in a fresh subprocess: "
            f"peak RSS above the RSS after building the model, the input latents and one 5-frame warm-up call "
            f"(baseline {_f(cases[0].get('baseline_mb'))} MB). Latent buffers: what the streamed hand-off holds "
            f"that grows with the frame count (the encoder's moments, their concatenation and quant_conv output, "
            f"the output latents, copies of the input latents: 6 × output + 2 × input latents). The rest of the "
            f"streamed peak is the VAE's own per-chunk working set at the target size (the same in both variants).",
        "", hb.markdown_table(headers, rows), "", *lines, *notes,
    ])
    return text, {"cases": cases, "growth": growth}


def _f(v, digits: int = 0) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


# ============================================================================================== goals
def goals(overhead: list[dict] | None, glue: list[dict] | None, ckpt: dict | None,
          handoff: dict | None) -> tuple[str, dict]:
    """The goal lines (sections not run are left out) and {goal: met}."""
    lines, met = ["## Goals"], {}
    if overhead:
        limit = OVERHEAD_GOAL
        verdicts = []
        for r in overhead:
            lo = r["ratio_ci95"][0]
            v = "ok" if r["ratio"] <= limit else ("over" if lo > limit else "within noise")
            verdicts.append(v)
            r["goal"] = v
        per = ", ".join(f"{r['model']} {r['ratio']:.4f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}] "
                        f"({r['goal']})" for r in overhead)
        met["overhead_end_to_end"] = all(v == "ok" for v in verdicts)
        word = "MET" if met["overhead_end_to_end"] else ("MISSED" if "over" in verdicts else "NOT RESOLVED")
        lines.append(f"- Per-step time new / old ≤ {limit:.2f}, end to end (paired median [95 % CI]): {per} → "
                     f"**{word}**")
        if glue:
            met["overhead_glue"] = all(g["share_of_step"] <= limit - 1 for g in glue)
            per = ", ".join(f"{r['model']} {g['delta_us_per_step']:+.0f} µs = {100 * g['share_of_step']:+.2f} %"
                            for r, g in zip(overhead, glue))
            lines.append(f"- Per-step overhead measured glue-only, over each real step (≤ {100 * (limit - 1):.0f} %): "
                         f"{per} → **{'MET' if met['overhead_glue'] else 'MISSED'}**")
        met["identical"] = all(r["identical"] for r in overhead + (glue or []))
        differ = ", ".join(r["model"] for r in overhead + (glue or []) if not r["identical"])
        lines.append(f"- Old and new paths give identical latents on every model: "
                     f"**{'YES' if met['identical'] else 'NO — ' + differ}**")
    if ckpt:
        worst_s = max(ckpt["save_median_s"], ckpt["load_median_s"], ckpt["load_cold_median_s"])
        met["checkpoint"] = worst_s < CHECKPOINT_GOAL_S
        lines.append(f"- Checkpoint of Wan 1.3B-sized latents: save {ckpt['save_median_s']:.3f} s, load "
                     f"{ckpt['load_median_s']:.3f} s (cold {ckpt['load_cold_median_s']:.3f} s), "
                     f"{ckpt['bytes_written'] / hb.MB:.1f} MB written, each < {CHECKPOINT_GOAL_S} s → "
                     f"**{'MET' if met['checkpoint'] else 'MISSED'}**; round-trip equal: "
                     f"{'yes' if ckpt['roundtrip_equal'] else '**NO**'}")
    if handoff:
        cases = [c for c in handoff["cases"] if not c["errors"]]
        below = bool(cases) and all(c["streamed_peak_mb"] < c["naive_peak_mb"] for c in cases)
        growth = handoff["growth"]
        if growth:
            flat = growth["streamed_mb"] <= growth["allowance_mb"]
            met["handoff"] = below and flat
            how = (f"streamed peak grows {growth['streamed_mb']:+.1f} MB from {growth['frames'][0]} to "
                   f"{growth['frames'][1]} frames (≤ one chunk + latent buffers, {growth['allowance_mb']:.1f} MB: "
                   f"{'yes' if flat else 'NO'}), naive {growth['naive_mb']:+.1f} MB")
        else:
            met["handoff"] = below
            how = "fewer than two frame counts measured (--quick runs one): flatness not checked"
        peaks = ", ".join(f"{c['frames']} frames {c['streamed_peak_mb']:.0f} vs {c['naive_peak_mb']:.0f} MB"
                          for c in cases)
        lines.append(f"- Pixel hand-off peak bounded by one chunk and below holding both videos: streamed vs naive "
                     f"{peaks or '–'}; {how} → **{'MET' if met['handoff'] else 'MISSED'}**")
    return "\n".join(lines), met


# =============================================================================================== main
def _progress(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:.0f} s] {msg}", file=sys.stderr, flush=True)


T0 = time.perf_counter()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and few rounds (~40 s)")
    p.add_argument("--rounds", type=int, default=None,
                   help="end-to-end timing rounds per model (default: 31-101 per model; --quick 3-5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    p.add_argument("--json", metavar="FILE", help="write every number to FILE")
    p.add_argument("--only", default="overhead,checkpoint,handoff", help="comma-separated sections to run")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "FRAMES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    threads = hb.set_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.child:
        handoff_child(sizes, args.child[0], int(args.child[1]))
        return 0

    import diffusers

    load0 = os.getloadavg()
    print(f"# Engine benchmark{' (--quick)' if args.quick else ''} — torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, {threads} thread(s), {platform.processor() or platform.machine()}, float32; "
          f"load average at start {load0[0]:.2f} on {os.cpu_count()} cores\n", flush=True)
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    overhead = glue = ckpt = handoff = None
    if "overhead" in wanted:
        text, overhead, glue = bench_overhead(sizes, args)
        print(text + "\n", flush=True)
    if "checkpoint" in wanted:
        text, ckpt = bench_checkpoint(sizes, args)
        print(text + "\n", flush=True)
    if "handoff" in wanted:
        text, handoff = bench_handoff(sizes, args, threads)
        print(text + "\n", flush=True)
    text, met = goals(overhead, glue, ckpt, handoff)
    print(text, flush=True)
    load1 = os.getloadavg()
    wall = time.perf_counter() - T0
    print(f"\nTotal wall time {wall:.0f} s; load average at end {load1[0]:.2f} on {os.cpu_count()} cores.")
    failures = [f"{r['model']}: old and new latents differ" for r in (overhead or []) + (glue or [])
                if not r["identical"]]
    failures += ["checkpoint round-trip mismatch"] if ckpt and not ckpt["roundtrip_equal"] else []
    failures += [f"hand-off {c['frames']} frames: {e}" for c in (handoff or {}).get("cases", []) for e in c["errors"]]
    if args.json:
        report = {"quick": args.quick, "threads": threads, "torch": torch.__version__,
                  "diffusers": diffusers.__version__, "load_average": [load0[0], load1[0]], "wall_s": wall,
                  "overhead": overhead, "glue": glue, "checkpoint": ckpt, "handoff": handoff, "goals": met, "failures": failures}
        Path(args.json).write_text(json.dumps(report, indent=1))
    if failures:
        print("\nCORRECTNESS FAILURES: " + "; ".join(failures), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
