"""Orchestration of one generation: the flow of DESIGN.md §2, and nothing else.

    adapter = load(recipe.model)                  # diffusers components
    cond    = adapter.encode(prompt)              # text conditioning (per keyframe for multi-prompt)
    with adapter.prepared(F), applied(methods):   # hooks in, always removed
        x = noise(shape, generator)               # the noise seam (FreeNoise) or plain Gaussian
        x = sample(denoise, x, timesteps)         # our loop; methods may wrap the denoiser
    decode_stream(x) -> MP4 (atomic) + JSON sidecar
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from longvid import registry
from longvid.core.context import GenerationContext
from longvid.core.noise import gaussian_noise
from longvid.core.sampler import sample, set_timesteps
from longvid.errors import OutOfMemoryError
from longvid.io.paths import check_writable, output_path
from longvid.io.sidecar import environment_info, sidecar_path, write_sidecar
from longvid.io.video import VideoWriter
from longvid.methods.base import Method, applied
from longvid.models.base import Conditioning, ModelAdapter
from longvid.recipe.resolve import to_dict
from longvid.recipe.schema import Recipe

#: progress(event, done, total) with event "step" or "decode"
Progress = Callable[[str, int, int], None]


@dataclass
class Result:
    """What a generation produced: the video file (None when not written), final latents and the sidecar."""

    path: Path | None
    latents: torch.Tensor
    sidecar: dict[str, Any] = field(default_factory=dict)


def load_adapter(recipe: Recipe) -> ModelAdapter:
    return registry.model_adapter(recipe.model.family).load(recipe)


def build_methods(recipe: Recipe) -> list[Method]:
    return [registry.method_class(name)(config) for name, config in recipe.methods.items()]


@torch.no_grad()  # inference only: an autograd graph would keep the text encoder's activations alive
def encode(adapter: ModelAdapter, recipe: Recipe) -> Conditioning:
    """Text conditioning; for ``{frame: prompt}`` every keyframe prompt is encoded once."""
    if isinstance(recipe.prompt, dict):
        keyframes = {int(k): adapter.encode(p, recipe.negative_prompt) for k, p in sorted(recipe.prompt.items(),
                                                                                         key=lambda kv: int(kv[0]))}
        first = keyframes[min(keyframes)]
        return Conditioning(first.positive, first.negative, keyframes=keyframes)
    return adapter.encode(recipe.prompt or "", recipe.negative_prompt)


def denoise_latents(adapter: ModelAdapter, recipe: Recipe, methods: list[Method] | None = None,
                    progress: Progress | None = None, timings: dict[str, float] | None = None) -> torch.Tensor:
    """Everything up to the final latents: conditioning, noise, methods, the loop."""
    timings = {} if timings is None else timings
    methods = build_methods(recipe) if methods is None else methods
    video = recipe.video
    device = adapter.device
    tick = time.perf_counter()
    cond = encode(adapter, recipe)
    timings["encode_s"] = time.perf_counter() - tick

    shape = adapter.latent_shape(video.num_frames, video.height, video.width)
    ctx = GenerationContext(num_frames=video.num_frames, height=video.height, width=video.width,
                            latent_frames=shape[2], latent_height=shape[3], latent_width=shape[4],
                            total_steps=recipe.sampler.steps)
    # A CPU generator draws the same noise on every device (diffusers' randn_tensor moves it over).
    generator = torch.Generator("cpu").manual_seed(recipe.seed)
    scheduler = adapter.make_scheduler()
    timesteps = set_timesteps(scheduler, recipe.sampler.steps, device)
    builders = [b for b in (m.noise_builder(adapter) for m in methods) if b is not None]
    noise = (builders[-1] if builders else gaussian_noise)(shape, generator, dtype=getattr(
        adapter, "latent_dtype", torch.float32), device=device)
    x = adapter.prepare_latents(noise, scheduler)

    tick = time.perf_counter()
    with adapter.prepared(video.num_frames), applied(methods, adapter, ctx):
        denoise = adapter.denoise  # denoise(x, t, cond); methods may wrap it (context windows, per-frame prompts)
        for method in methods:
            denoise = method.wrap_denoiser(denoise, adapter, ctx)
        step = (lambda i, n, _: progress("step", i, n)) if progress else None
        x = sample(lambda x_, t_: denoise(x_, t_, cond), x, scheduler, timesteps, step_kwargs=adapter.step_kwargs(scheduler, generator), ctx=ctx,
                   callback=step)
    timings["denoise_s"] = time.perf_counter() - tick
    return x


def generate(recipe: Recipe, *, adapter: ModelAdapter | None = None, write: bool = True,
             progress: Progress | None = None) -> Result:
    """Run ``recipe`` end to end; write the MP4 and its sidecar unless ``write`` is False."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    path = _output_file(recipe) if write else None  # fail on an existing file before loading
    own_adapter = adapter is None
    if own_adapter:
        tick = time.perf_counter()
        adapter = load_adapter(recipe)
        timings["load_s"] = time.perf_counter() - tick
    if adapter.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(adapter.device)
    try:
        latents = denoise_latents(adapter, recipe, progress=progress, timings=timings)
        tick = time.perf_counter()
        if path is not None:
            _write_video(adapter, recipe, latents, path, progress)
        timings["decode_s"] = time.perf_counter() - tick
    except torch.OutOfMemoryError as err:
        v = recipe.video
        raise OutOfMemoryError(f"video.num_frames: out of memory at {v.num_frames} frames {v.width}x{v.height}; "
                               "use fewer frames or pixels, or set runtime.offload=model") from err
    finally:
        if own_adapter:
            adapter.close()
    timings["total_s"] = time.perf_counter() - start
    sidecar = {
        "longvid_sidecar": 1,
        "output": str(path) if path else None,
        "recipe": to_dict(recipe),
        "seed": recipe.seed,
        "latent_shape": list(latents.shape),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "peak_memory": _peak_memory(adapter.device),
        "environment": environment_info(adapter.device),
    }
    if path is not None:
        write_sidecar(sidecar_path(path), sidecar, overwrite=recipe.output.overwrite)
        if recipe.output.save_latents:
            tmp = path.with_name(f".{path.stem}.latents.partial")
            torch.save(latents.cpu(), tmp)
            tmp.replace(path.with_suffix(".latents.pt"))
    return Result(path, latents, sidecar)


def _output_file(recipe: Recipe) -> Path:
    """The output path, checked before any work: neither the video nor its sidecar may exist (unless
    overwriting), since the sidecar is written last and a clash there would orphan a finished video."""
    prompt = recipe.prompt if isinstance(recipe.prompt, str) else recipe.prompt[min(recipe.prompt, key=int)]
    ext = ".mkv" if recipe.output.codec == "ffv1" else ".mp4"
    path = output_path(recipe.output.dir, recipe.output.name, ext=ext, recipe=recipe.name or recipe.model.family,
                       prompt=prompt or "video", seed=recipe.seed, frames=recipe.video.num_frames,
                       width=recipe.video.width, height=recipe.video.height)
    check_writable(path, recipe.output.overwrite)
    check_writable(sidecar_path(path), recipe.output.overwrite)
    return path


def _write_video(adapter: ModelAdapter, recipe: Recipe, latents: torch.Tensor, path: Path,
                 progress: Progress | None) -> None:
    """Stream decoded chunks straight into the encoder: the whole video is never held in memory."""
    out = recipe.output
    pix_fmt = "bgr0" if out.codec == "ffv1" else "yuv420p"
    done, total = 0, recipe.video.num_frames
    with VideoWriter(path, fps=recipe.video.fps, codec=out.codec, crf=out.crf, preset=out.preset, pix_fmt=pix_fmt,
                     overwrite=out.overwrite) as writer:
        for chunk in adapter.decode_stream(latents):  # (B, 3, f, H, W) in [-1, 1]
            writer.write(chunk[0])
            done += chunk.shape[2]
            if progress:
                progress("decode", min(done, total), total)


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device)}
    return {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
