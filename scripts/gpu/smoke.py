"""GPU smoke check: longvid's engine at real size, random weights, one command (< 8 min on one H200).

    python scripts/gpu/smoke.py [--tiny] [--steps N] [--cases a,b] [--out FILE.json]

Every model is built in code (no downloads): Wan 2.1 T2V 1.3B with its released transformer and VAE configs
and random weights (transformer bf16, VAE fp32), and a 1-layer UMT5 encoder of width 4096 standing in for
UMT5-XXL (text encoding is not what this checks). One ``WanAdapter`` serves every case of one load key (the
memory-knob cases get a freshly built model each), each run through
``runner.generate`` exactly as the CLI runs a recipe (CFG 5.0, a few steps):

1. ``vanilla-81``     81 frames at 480x832 (latents 16x21x60x104), plain 3D attention.
2. ``freenoise-161``  161 frames, FreeNoise context windows (window 81 frames, fused predictions).
3. ``freelong-161``   161 frames, FreeLong SpectralBlend attention (window 81) + FreeNoise noise only.
4. ``upscale-720p``   81 frames at 480x832, then refined at 720x1280 (strength 0.7, flow shift 9, pixel
                      hand-off: VAE decode, resize, encode at full size).
5. ``freeloc-161``    161 frames, FreeLOC with the built-in Wan 2.1 1.3B layer preset (VRPR / TSA through compiled
                      flex_attention block masks, one per branch).
6. ``ultravico-161``  161 frames, UltraViCo far-pair logit decay (compiled flex_attention score_mod).
7. ``freeswim-1080p`` 81 frames at 480x832, then FreeSwim at 1088x1920 (pixel hand-off, strength 0.7): the refine
                      stage's first step is a guide step (window + full branch, cache stored), the second a reuse
                      step (window branch alone, batch 1); compiled flex on a tile-major block mask.
8. ``fp8-81``         ``vanilla-81`` with the transformer's weights stored in fp8 (``runtime.layerwise_casting``:
                      float8_e4m3fn, upcast to bf16 per layer).
9. ``group-offload-81`` ``vanilla-81`` with diffusers' group offloading (``runtime.offload: group``: one block at a
                      time from pinned CPU memory on CUDA streams).
10. ``pyramid-flow-384p`` Pyramid Flow miniFLUX at its released size (1.97 B parameters, random, bf16; the causal
                      VAE at its released size; 1-layer CLIP-L/T5 stand-ins), 9 frames (2 latent units) at 384x640:
                      the image unit, then one autoregressive unit with its pyramid history; a "step" is a unit.
11. ``pyramid-offload-384p`` ``pyramid-flow-384p`` with ``runtime.offload: model`` (per phase: text encoders,
                      then the DiT, then the VAE on the GPU, the rest in CPU memory): its peak memory against case 10.

The length-extrapolation check (``--cases long``, not in the default run: it takes about as long again): one Wan
step at 2x and 4x the trained length, each method against vanilla at the same length: ``vanilla-161``,
``vanilla-321`` (plain 3D attention over 41 / 81 latent frames), ``freeloc-321`` (the built-in preset at 4x),
``ultravico-321``, ``riflex-321`` (a table edit: its step should cost vanilla's) and ``ntk-161``;
``freeloc-161`` and ``ultravico-161`` above are the 2x methods. ``--cases all`` runs every case.

The kernel choices (``--cases kernels``, not in the default run: ``scripts/gpu/kernels.py``, a few minutes):
every candidate GPU path of FreeNoise's per-layer windows and block fusion and of FreeLong's local branch (SDPA
backends, row-chunk budgets, query frames per call, a compiled flex block mask) timed side by side, written to
``kernels.json`` beside the smoke JSON.

Reading the numbers (one table row per stage; the JSON has every step and the sidecar's stage timings): each
stage's schedule has ``--steps N`` steps, of which the refine stage runs the last int(0.7 N). ``first s`` is a
stage's first denoising step (kernel selection and allocator warm-up included), ``s/step`` the median of its
later steps (the number to extrapolate from: 50 steps take about 50x it), ``total s`` the whole case (text
encoding, hand-off, every step; no final video decode: nothing is written), ``peak GiB`` the case's
``torch.cuda.max_memory_allocated`` (weights included; reset per case) or, off CUDA, the process's peak RSS
(monotone over the run). A step is timed from the transformer's first call (CUDA synchronised) to the step's
progress event, both CFG passes included. The output is noise (random weights); ``finite`` says the latents
hold no NaN/inf. A case fails on an exception or non-finite latents; the exit code is then 1.

``--tiny`` runs the same code path with longvid's tiny Wan (2 blocks, CPU float32 unless CUDA is there) at
toy sizes in seconds, so the test suite (tests/test_smoke.py) keeps this script working.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; fail fast if something tries
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch  # noqa: E402

#: sizes of the cases: frames, long frames, base and refine HxW, FreeNoise/FreeLong window (video frames)
REAL = {"frames": 81, "long": 161, "long4": 321, "base": (480, 832), "refine": (720, 1280), "window": 81,
        "swim": (1088, 1920)}
TINY = {"frames": 9, "long": 17, "long4": 33, "base": (32, 48), "refine": (64, 96), "window": 9, "swim": (64, 96)}
CASES = ("vanilla-81", "freenoise-161", "freelong-161", "upscale-720p", "freeloc-161", "ultravico-161",
         "freeswim-1080p", "fp8-81", "group-offload-81", "pyramid-flow-384p", "pyramid-offload-384p")
LONG_CASES = ("vanilla-161", "vanilla-321", "freeloc-321", "ultravico-321", "riflex-321", "ntk-161")  # --cases long
PYRAMID_CASES = ("pyramid-flow-384p", "pyramid-offload-384p")  # another family: its own adapter, after the Wan cases
PROMPT = "a red fox running through fresh snow at dawn, cinematic"


def case_recipes(size: dict) -> dict[str, dict]:
    """The recipe sections that differ between cases (model, sampler, prompt and runtime are shared)."""
    tiny = size is TINY
    (h, w), (rh, rw), win = size["base"], size["refine"], size["window"]
    short = {"num_frames": size["frames"], "height": h, "width": w, "fps": 16}
    long = {**short, "num_frames": size["long"]}
    long4 = {**short, "num_frames": size["long4"]}
    # The windows are spelled out so --tiny's 17 frames really get windows (81 is the default on Wan).
    return {
        "vanilla-81": {"video": short},
        "freenoise-161": {"video": long, "methods": {"freenoise": {"window": win}}},
        "freelong-161": {"video": long, "methods": {"freelong": {"window": win},
                                                    "freenoise": {"fusion": "none", "window": win}}},
        # the tiny model has no FreeLOC preset and its 17 frames are within the trained length: open the gates
        "freeloc-161": {"video": long, "methods": {"freeloc": {"tsa_layers": [0], "gate": False} if tiny else {}}},
        "ultravico-161": {"video": long, "methods": {"ultravico": {"gate": False} if tiny else {}}},
        "vanilla-161": {"video": long},
        "vanilla-321": {"video": long4},
        "freeloc-321": {"video": long4, "methods": {"freeloc": {"tsa_layers": [0], "gate": False} if tiny else {}}},
        "ultravico-321": {"video": long4, "methods": {"ultravico": {"gate": False} if tiny else {}}},
        # Wan's k = 6 (period 51 latent frames); the tiny run's 9 latent frames are below it: open the gate
        "riflex-321": {"video": long4, "methods": {"riflex": {"k": 6, **({"gate": False} if tiny else {})}}},
        "ntk-161": {"video": long, "methods": {"ntk": {"scale": 2.0} if tiny else {}}},  # tiny: within its length
        "freeswim-1080p": {"video": {**short, "height": size["swim"][0], "width": size["swim"][1]},
                           "stages": {"base": {"height": h, "width": w},
                                      "refine": {"strength": 0.7, "upsample": "pixel", "sampler": {"flow_shift": 9.0}}},
                           "methods": {"freeswim": {"stages": ["refine"], "mode": "cache", "cache_steps": 2}}},
        # memory knobs: another load key each, so another (freshly built) model
        "fp8-81": {"video": short, "runtime": {"layerwise_casting": "float8_e4m3fn"}},
        "group-offload-81": {"video": short, "runtime": {"offload": "group"}},
        "upscale-720p": {"video": {**short, "height": rh, "width": rw},
                         "stages": {"base": {"height": h, "width": w},
                                    "refine": {"strength": 0.7, "upsample": "pixel", "sampler": {"flow_shift": 9.0}}}},
    }


def build_pipe(tiny: bool, device: torch.device):
    """The WanPipeline, built in code (longvid's WanAdapter.from_pipeline then casts and places it as it would a
    loaded checkpoint: bf16 denoiser with its fp32 modules, fp32 VAE, eval mode)."""
    from longvid.models import tiny as tiny_models

    torch.manual_seed(0)
    if tiny:
        return tiny_models.build("wan")
    else:
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        tok = tiny_models.t5_tokenizer()
        with torch.device(device):  # random init of 1.3B parameters on the GPU, not the CPU
            transformer = WanTransformer3DModel(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
                patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
            vae = AutoencoderKLWan()  # the default config is the released Wan 2.1 VAE's
            text_encoder = UMT5EncoderModel(UMT5Config(
                vocab_size=len(tok), d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=4,
                relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, flow_shift=3.0)
        return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                           scheduler=scheduler)


def build_pyramid(tiny: bool, device: torch.device):
    """Pyramid Flow (miniFLUX) built in code: the released DiT and VAE sizes with random weights, 1-layer text
    encoder stand-ins of the released widths (CLIP-L pooled 768, T5 4096)."""
    from longvid.models import tiny as tiny_models

    torch.manual_seed(0)
    if tiny:
        return tiny_models.build("pyramid-flow")
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from longvid.models.pyramid_flow.adapter import PyramidPipeline
    from longvid.models.pyramid_flow.dit_flux import MINIFLUX_CONFIG
    from longvid.models.pyramid_flow.vae import CausalVideoVAE

    clip_tok, t5_tok = tiny_models.clip_tokenizer(), tiny_models.t5_tokenizer(128)
    with torch.device(device):
        dit = FluxTransformer2DModel(**MINIFLUX_CONFIG)
        vae = CausalVideoVAE()
        clip = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=768,
                                            intermediate_size=3072, num_attention_heads=12, num_hidden_layers=1,
                                            vocab_size=len(clip_tok), max_position_embeddings=77))
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                     num_heads=4))
    return PyramidPipeline("miniflux", dit, vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                           tokenizer_2=t5_tok)


def pyramid_recipe(tiny: bool, steps: int, device: torch.device, name: str = "pyramid-flow-384p") -> dict:
    h, w = (64, 64) if tiny else (384, 640)
    dtype = "float32" if tiny else "bfloat16"
    runtime = {"device": device.type, **({"offload": "model"} if name == "pyramid-offload-384p" else {})}
    return {"name": f"smoke-{name}", "prompt": PROMPT, "seed": 0, "runtime": runtime,
            "model": {"family": "pyramid_flow", "path": "tiny:pyramid-flow" if tiny else
                      "smoke:pyramid-flow-miniflux-random", "dtype": dtype, "text_encoder_dtype": dtype,
                      "vae_dtype": dtype, "options": {"image_steps": [steps] * 3}},
            "video": {"num_frames": 9, "height": h, "width": w, "fps": 24},
            "sampler": {"steps": steps, "guidance_scale": 7.0}}


class StepClock:
    """Times every denoising step: from the transformer's first call in a stage (a forward pre-hook) to the
    step's progress event, then from event to event. CUDA is synchronised at every mark."""

    def __init__(self, transformer: torch.nn.Module, device: torch.device):
        self.device = device
        self.stages: dict[str, list[float]] = {}
        self.mark: float | None = None
        transformer.register_forward_pre_hook(self._first_call)

    def reset(self) -> None:
        self.stages, self.mark = {}, None

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _first_call(self, module, args) -> None:
        if self.mark is None:
            self.mark = self.now()

    def progress(self, event: str, done: int, total: int) -> None:
        if event != "step" and not event.startswith("step:"):
            return  # hand-off and decode progress
        now = self.now()
        self.stages.setdefault(event.partition(":")[2] or "main", []).append(now - self.mark)
        self.mark = None if done == total else now  # the next stage starts at its first transformer call


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def run_case(name: str, recipe, adapter, clock: StepClock, device: torch.device) -> dict:
    from longvid import runner

    row: dict = {"case": name}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock.reset()
    start = time.perf_counter()
    try:
        result = runner.generate(recipe, adapter=adapter, write=False, progress=clock.progress)
        latents = result.latents.float()
        row.update(latent_shape=list(latents.shape), finite=bool(torch.isfinite(latents).all()),
                   latents_std=round(float(latents.std()), 4), latents_digest=_digest(latents),
                   sidecar_stages=result.sidecar["stages"],
                   sidecar_timings=result.sidecar["timings"])
        del result, latents
    except Exception as err:  # record, go on with the next case
        lines = str(err).strip().splitlines()
        row["error"] = f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
    row["total_s"] = round(clock.now() - start, 3)
    row["peak_memory_bytes"], row["peak_memory_kind"] = peak_memory(device)
    row["stages"] = [{"stage": stage, "steps": len(t), "step_s": [round(s, 4) for s in t],
                      "first_step_s": round(t[0], 4),
                      "median_step_s": round(statistics.median(t[1:]), 4) if len(t) > 1 else None}
                     for stage, t in clock.stages.items()]
    row["steps_timed"] = sum(len(t) for t in clock.stages.values())
    return row


def table(rows: list[dict]) -> str:
    cols = ("case", "stage", "frames", "size", "steps", "first s", "s/step", "total s", "peak GiB", "finite")
    lines = []
    for row in rows:
        sizes = {s["name"]: s for s in row.get("sidecar_stages", [])}
        for i, st in enumerate(row["stages"] or [{"stage": "-"}]):
            sz = sizes.get(st["stage"], {})
            lines.append((row["case"] if i == 0 else "", st["stage"], str(sz.get("num_frames", "-")),
                          f"{sz['height']}x{sz['width']}" if sz else "-", str(st.get("steps", 0)),
                          f"{st['first_step_s']:.3f}" if "first_step_s" in st else "-",
                          f"{st['median_step_s']:.3f}" if st.get("median_step_s") is not None else "-",
                          f"{row['total_s']:.2f}" if i == 0 else "", f"{row['peak_memory_bytes'] / 2**30:.2f}"
                          if i == 0 else "", str(row.get("finite", "-")) if i == 0 else ""))
        if "error" in row:
            lines.append(("", "ERROR", row["error"], "", "", "", "", "", "", ""))
    widths = [max(len(c), *(len(x[i]) for x in lines if x[1] != "ERROR")) for i, c in enumerate(cols)]

    def fmt(r):
        return "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()

    return "\n".join([fmt(cols), fmt(["-" * w for w in widths])] +
                     [("  ".join(r[:3]) if r[1] == "ERROR" else fmt(r)) for r in lines])


def _digest(latents: torch.Tensor) -> list[float]:
    """A few float64 moments of the final latents: equal runs give equal digests, a method that acts changes them."""
    x = latents.detach().double().flatten()
    return [round(float(v), 9) for v in (x.mean(), x.abs().mean(), (x * torch.linspace(-1, 1, x.numel(),
                                                                                  dtype=x.dtype, device=x.device)).mean())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models at toy sizes (CPU unless CUDA is there)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps of each stage's schedule (default 3)")
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES + LONG_CASES)}; "
                                         "'long': the length-extrapolation cases; 'all': every case")
    parser.add_argument("--out", type=Path, help="JSON file (default: $OUT/smoke.json, else ./smoke.json)")
    args = parser.parse_args(argv)
    groups_of = {"long": list(LONG_CASES), "all": list(CASES + LONG_CASES)}
    names = [n for c in (args.cases.split(",") if args.cases else CASES) for n in groups_of.get(c, [c])]
    kernels = "kernels" in names
    names = [n for n in names if n != "kernels"]
    unknown = [n for n in names if n not in CASES + LONG_CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES + LONG_CASES)}, long, all, "
                     "kernels")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (use --tiny for the CPU check)")
    out = args.out or Path(os.environ.get("OUT") or ".") / "smoke.json"
    size = TINY if args.tiny else REAL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models are overhead-bound; this is also what the test suite runs with
    torch.backends.cuda.matmul.allow_tf32 = True

    from longvid.io.sidecar import environment_info
    from longvid.models.base import load_key
    from longvid.models.wan import WanAdapter
    from longvid.recipe.resolve import resolve

    env = environment_info(device)
    print(f"longvid smoke ({'tiny' if args.tiny else 'real size'}, {args.steps} steps): torch {env['torch']} "
          f"diffusers {env['diffusers']} transformers {env['transformers']} cuda {env['cuda']} on "
          f"{env['device_name']} ({device})", flush=True)
    dtype = "float32" if args.tiny else "bfloat16"
    shared = {"model": {"family": "wan", "path": "tiny:wan" if args.tiny else "smoke:wan2.1-t2v-1.3b-random",
                        "dtype": dtype, "text_encoder_dtype": dtype, "vae_dtype": "float32"},
              "sampler": {"steps": args.steps, "guidance_scale": 5.0, "max_sequence_length": 32},
              "prompt": PROMPT, "seed": 0, "runtime": {"device": device.type}}
    recipes = {name: resolve({"name": f"smoke-{name}", **shared, **case,
                              "runtime": {**shared["runtime"], **case.get("runtime", {})}})
               for name, case in case_recipes(size).items() if name in names}  # all validated before any model
    recipes.update({name: resolve(pyramid_recipe(args.tiny, args.steps, device, name)) for name in PYRAMID_CASES
                    if name in names})

    report = {"mode": "tiny" if args.tiny else "real", "steps": args.steps, "device": str(device), "environment": env,
              "transformer_parameters": None, "cases": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[str]] = {}  # one built model per family and load key, in case order
    for name in names:
        family = "pyramid_flow" if name in PYRAMID_CASES else "wan"
        groups.setdefault((family, json.dumps(load_key(recipes[name]), sort_keys=True)), []).append(name)
    for (family, _), group in groups.items():
        tick = time.perf_counter()
        if family == "wan":
            pipe = build_pipe(args.tiny, device)
            adapter = WanAdapter.from_pipeline(pipe, recipes[group[0]])
            denoiser, first_module = pipe.transformer, pipe.transformer
        else:
            from longvid.models.pyramid_flow.adapter import PyramidFlowAdapter

            pipe = build_pyramid(args.tiny, device)
            adapter = PyramidFlowAdapter.from_pipeline(pipe, recipes[group[0]])
            denoiser, first_module = pipe.dit, pipe.dit.x_embedder  # its forward runs module by module
        params = sum(p.numel() for p in denoiser.parameters())
        report["transformer_parameters"] = report["transformer_parameters"] or params
        print(f"built {family} in {time.perf_counter() - tick:.1f} s (denoiser: {params:,} parameters)", flush=True)
        clock = StepClock(first_module, device)
        for name in group:
            print(f"[{name}] ...", flush=True)
            row = run_case(name, recipes[name], adapter, clock, device)
            row["denoiser_parameters"] = params
            report["cases"].append(row)
            out.write_text(json.dumps(report, indent=1))  # after every case: a killed run keeps what it finished
            print(f"[{name}] {row.get('error') or 'ok'} in {row['total_s']:.2f} s", flush=True)
        adapter.close()
        del adapter, pipe, denoiser, first_module, clock
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = []
    if report["cases"]:
        print("\n" + table(report["cases"]))
        failed = [r["case"] for r in report["cases"] if "error" in r or not r.get("finite")]
        print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all cases ok'}; JSON: {out}")
    if kernels:
        import importlib.util

        spec = importlib.util.spec_from_file_location("longvid_gpu_kernels", Path(__file__).with_name("kernels.py"))
        kernel_choices = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernel_choices)
        if kernel_choices.main((["--tiny"] if args.tiny else []) + ["--out", str(out.with_name("kernels.json"))]):
            failed.append("kernels")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
