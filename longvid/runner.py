"""Orchestration of one generation: the flow of DESIGN.md §2, and nothing else.

    adapter = load(recipe.model)                       # or a loaded model shared by many runs
    cond    = adapter.encode(prompt, sampler)          # text conditioning (per keyframe for multi-prompt)
    for stage in plan_stages(recipe):                  # one stage, or coarse -> fine
        x = noise | renoise(handoff(x), t_start)       # the noise seam (FreeNoise) or Gaussian
        with adapter.prepared(F), applied(methods):    # the stage's methods: hooks in, always removed
            x = adapter.sample_stage(job)              # our loop (or the family's); reports every step
    decode_stream(x) -> MP4 (atomic) + JSON sidecar

Every step reports to :class:`_Steps`, which drives progress, writes checkpoints (``runtime.checkpoint``)
and stops the run cleanly when SIGTERM/SIGUSR1 arrived; a rerun of the same recipe resumes from the
checkpoint bit-identically.
"""

from __future__ import annotations

import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from longvid import registry
from longvid.core.context import GenerationContext
from longvid.core.guidance import guided
from longvid.core.noise import gaussian_noise
from longvid.core.sampler import LoopState, StageJob, scheduler_state, set_timesteps
from longvid.core.stages import handoff, renoise
from longvid.errors import OutOfMemoryError, OutputExistsError, Problem, RecipeError
from longvid.interrupts import StopRequests
from longvid.io.checkpoint import Checkpoint, CheckpointStore, Checkpointed, checkpoint_dir, recipe_hash
from longvid.io.paths import (OutputError, check_output_folder, check_writable, create_exclusive, output_path,
                              partial_path, publish, remove_quietly, sweep_stale)
from longvid.io.sidecar import environment_info, prepare_sidecar, sidecar_path
from longvid.io.video import VideoWriter
from longvid.methods.base import Method, applied
from longvid.models.base import Conditioning, ModelAdapter, uses_cfg
from longvid.recipe.resolve import to_dict
from longvid.recipe.schema import Recipe
from longvid.recipe.stages import StagePlan, plan_stages

#: progress(event, done, total); events: "step" (one stage) or "step:<stage>", "handoff:<stage>", "decode"
Progress = Callable[[str, int, int], None]


@dataclass
class Result:
    """What a generation produced: the video file (None when not written), final latents and the sidecar."""

    path: Path | None
    latents: torch.Tensor
    sidecar: dict[str, Any] = field(default_factory=dict)


def load_adapter(recipe: Recipe) -> ModelAdapter:
    return registry.model_adapter(recipe.model.family).load(recipe)


def build_methods(recipe: Recipe, names: tuple[str, ...] | list[str] | None = None) -> list[Method]:
    """Fresh method instances (no state carried over) for ``names`` (default: every method of the recipe)."""
    names = list(recipe.methods) if names is None else names
    return [registry.method_class(name)(recipe.methods[name]) for name in names]


@torch.no_grad()  # inference only: an autograd graph would keep the text encoder's activations alive
def encode(adapter: ModelAdapter, recipe: Recipe) -> Conditioning:
    """Text conditioning; for ``{frame: prompt}`` every keyframe prompt is encoded once. The negative prompt is
    encoded when any stage guides."""
    sampler = recipe.sampler
    plans = plan_stages(recipe)
    guided_plan = next((p for p in plans if uses_cfg(p.sampler)), None)
    if guided_plan is not None:
        sampler = guided_plan.sampler
    if isinstance(recipe.prompt, dict):
        keyframes = {int(k): adapter.encode(p, recipe.negative_prompt, sampler)
                     for k, p in sorted(recipe.prompt.items(), key=lambda kv: int(kv[0]))}
        first = keyframes[min(keyframes)]
        return Conditioning(first.positive, first.negative, keyframes=keyframes)
    return adapter.encode(recipe.prompt or "", recipe.negative_prompt, sampler)


def denoise_latents(adapter: ModelAdapter, recipe: Recipe, progress: Progress | None = None,
                    timings: dict[str, Any] | None = None, *, steps: "_Steps | None" = None,
                    resume: Checkpoint | None = None) -> torch.Tensor:
    """Everything up to the final latents: conditioning, then every stage (noise or hand-off, methods, loop).
    ``steps`` receives every step (progress, checkpoints, stop requests); ``resume`` continues a checkpoint."""
    timings = {} if timings is None else timings
    plans = plan_stages(recipe)
    steps = steps or _Steps(recipe, progress)
    if resume is not None and resume.data.get("done"):
        timings["resumed_from"] = {"stage": resume.data["stage"], "step": resume.data["step"]}
        return resume.tensors["loop.latents"].to(adapter.device)
    tick = time.perf_counter()
    cond = encode(adapter, recipe)
    timings["encode_s"] = time.perf_counter() - tick
    # A CPU generator draws the same noise on every device (diffusers' randn_tensor moves it over).
    generator = torch.Generator("cpu").manual_seed(recipe.seed)
    steps.generator = generator
    first = 0
    if resume is not None:
        first = int(resume.data["stage_index"])
        generator.set_state(resume.tensors["generator"])
        timings["resumed_from"] = {"stage": resume.data["stage"], "step": resume.data["step"]}
    stage_timings = timings.setdefault("stages", [])
    x = None
    if resume is not None and resume.data.get("handoff"):  # stopped during a hand-off: redo it from the result
        x, resume = resume.tensors["loop.latents"].to(adapter.device), None
    for plan in plans[first:]:
        state = resume if (resume is not None and plan.index == first) else None
        x = _run_stage(adapter, recipe, plan, plans, cond, generator, x, steps, state, stage_timings)
    timings["denoise_s"] = sum(s.get("denoise_s", 0.0) + s.get("handoff_s", 0.0) for s in stage_timings)
    return x


def _run_stage(adapter: ModelAdapter, recipe: Recipe, plan: StagePlan, plans: list[StagePlan], cond, generator,
               x: torch.Tensor | None, steps: "_Steps", resume: Checkpoint | None, stage_timings: list) -> torch.Tensor:
    """One stage: its starting latents (noise, hand-off + re-noise, or a checkpoint), its methods, its loop."""
    device = adapter.device
    shape = adapter.latent_shape(plan.num_frames, plan.height, plan.width)
    ctx = GenerationContext(num_frames=plan.num_frames, height=plan.height, width=plan.width,
                            latent_frames=shape[2], latent_height=shape[3], latent_width=shape[4],
                            total_steps=plan.sampler.steps, step=plan.start_step, stage=plan.name,
                            stage_index=plan.index, start_step=plan.start_step,
                            first_size=(plans[0].height, plans[0].width))
    scheduler = adapter.make_scheduler(plan.sampler)
    timesteps = set_timesteps(scheduler, plan.sampler.steps, device, plan.start_step)
    methods = build_methods(recipe, plan.methods)
    builders = [b for b in (m.noise_builder(adapter) for m in methods) if b is not None]
    noise_fn = builders[-1] if builders else gaussian_noise
    record: dict[str, Any] = {"name": plan.name, "num_frames": plan.num_frames, "height": plan.height,
                              "width": plan.width, "steps": plan.sampler.steps, "start_step": plan.start_step,
                              "strength": plan.strength, "upsample": plan.upsample, "methods": list(plan.methods)}
    stage_timings.append(record)
    tick = time.perf_counter()
    loop_state = None
    if resume is not None:
        latents = torch.empty(shape, dtype=torch.float32, device=device)  # replaced by the checkpoint's
        loop_state = LoopState(int(resume.data["step"]), _prefixed(resume.tensors, "loop."), resume.data["loop"])
    elif plan.index == 0:
        noise = noise_fn(shape, generator, dtype=adapter.latent_dtype, device=device)
        latents = adapter.prepare_latents(noise, scheduler)
    else:
        init = handoff(adapter, x, plan, recipe.runtime, steps.handoff_reporter(plan, x))
        init = init.to(adapter.latent_dtype)
        noise = noise_fn(tuple(init.shape), generator, dtype=init.dtype, device=device)
        latents = renoise(scheduler, init, noise, timesteps[plan.start_step])
        record["handoff_s"] = round(time.perf_counter() - tick, 4)
    tick = time.perf_counter()
    with adapter.prepared(plan.num_frames), applied(methods, adapter, ctx):
        if resume is not None:
            for m in methods:
                m.load_state_dict(_prefixed(resume.tensors, f"method.{m.name}."),
                                  resume.data.get("methods", {}).get(m.name, {}))
        denoise = guided(adapter, plan.sampler, ctx)  # denoise(x, t, cond); methods may wrap it
        for method in methods:
            denoise = method.wrap_denoiser(denoise, adapter, ctx)
        job = StageJob(denoise=denoise, cond=cond, latents=latents, scheduler=scheduler, timesteps=timesteps,
                       start=plan.start_step, ctx=ctx, generator=generator,
                       step_kwargs=adapter.step_kwargs(scheduler, generator, plan.sampler),
                       on_step=steps.reporter(plan, methods), resume=loop_state, plan=plan, recipe=recipe)
        x = adapter.sample_stage(job)
    record["denoise_s"] = round(time.perf_counter() - tick, 4)
    return x


def _check_schedulers(adapter: ModelAdapter, recipe: Recipe, checkpointing: bool) -> None:
    """Build every stage's scheduler from the loaded model's config and take one probe step before any work: a
    scheduler that cannot take this model's schedule (a flow model with an epsilon-only scheduler, a bad
    setting), a second-order one (its timesteps repeat: longvid's step counting and strength assume one model
    call per step) or, when checkpointing, one whose state cannot be saved, is one line."""
    if adapter.spec.loop != "steps":  # the family runs its own schedule (Pyramid Flow)
        return
    for plan in plan_stages(recipe):
        key = f"stages.{plan.name}.sampler" if recipe.stages else "sampler"
        name = plan.sampler.scheduler or type(adapter.pipe.scheduler).__name__
        try:
            scheduler = adapter.make_scheduler(plan.sampler)  # a throwaway: the run builds its own
            timesteps = set_timesteps(scheduler, plan.sampler.steps, adapter.device)
            probe = torch.zeros(1, 1, 1, 1, 1, device=adapter.device)
            scheduler.step(probe, timesteps[0], probe, **adapter.step_kwargs(
                scheduler, torch.Generator("cpu").manual_seed(0), plan.sampler), return_dict=False)
        except Exception as err:  # diffusers raises ValueError, TypeError, ZeroDivisionError, ...
            first = " ".join(str(err).split())[:200] or type(err).__name__
            raise RecipeError([Problem(f"{key}.scheduler", f"{name} cannot run this model's schedule ({first}); "
                                                          "choose another scheduler or settings")]) from None
        if getattr(scheduler, "order", 1) != 1 or len(timesteps) != plan.sampler.steps:
            raise RecipeError([Problem(f"{key}.scheduler", f"{name} is a second-order scheduler (two model calls "
                                                          "per step), which longvid's loop does not run; choose "
                                                          "UniPC, DPM++, Euler, DDIM or FlowMatchEuler")])
        if checkpointing:
            try:
                scheduler_state(scheduler)  # after a step: the attributes a run really carries
            except TypeError as err:
                raise RecipeError([Problem("runtime.checkpoint", f"{name} cannot be checkpointed ({err}); use "
                                                                 "another scheduler or runtime.checkpoint=off")]) \
                    from None


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


class _Steps:
    """Receives every step of every stage and the safe points between phases: progress, periodic checkpoints,
    and the stop a signal requested (a checkpoint and exit 75 when ``store`` is set, else exit 143)."""

    def __init__(self, recipe: Recipe, progress: Progress | None, store: CheckpointStore | None = None,
                 stop: StopRequests | None = None):
        self.recipe, self.progress, self.store, self.stop = recipe, progress, store, stop
        self.plans = plan_stages(recipe)
        self.every = recipe.runtime.checkpoint_every if recipe.runtime.checkpoint == "every_n" else None
        self.generator: torch.Generator | None = None

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.requested is not None

    def progress_fn(self, event: str) -> Callable[[int, int], None] | None:
        if self.progress is None:
            return None
        return lambda done, total: self.progress(event, done, total)

    def reporter(self, plan: StagePlan, methods: list[Method]):
        event = "step" if len(self.plans) == 1 else f"step:{plan.name}"

        def on_step(done: int, capture: Callable[[], LoopState]) -> None:
            if self.progress is not None:
                self.progress(event, done - plan.start_step, plan.steps_run)
            periodic = (self.every is not None and (done - plan.start_step) % self.every == 0
                        and done < plan.sampler.steps)
            if self.store is not None and (self.stopping or periodic):
                self.save(plan, capture(), methods)
            if self.stopping:
                raise self.stopped(plan, done)

        return on_step

    def handoff_reporter(self, plan: StagePlan, previous: torch.Tensor) -> Callable[[int, int], None]:
        """Between hand-off chunks: a stop keeps the previous stage's result and the generator state before this
        stage's noise, so the rerun repeats the hand-off exactly (a long hand-off never outlasts a grace period)."""
        report = self.progress_fn(f"handoff:{plan.name}")

        def on_chunk(done: int, total: int) -> None:
            if report is not None:
                report(done, total)
            if self.stopping:
                if self.store is not None:
                    self.save(plan, LoopState(plan.start_step, {"latents": previous}), [], handoff=True)
                raise self.stopped(plan, plan.start_step, handoff=True)

        return on_chunk

    def check_decode(self, latents: torch.Tensor) -> None:
        """Between decoded chunks and before publishing: a stop keeps the final latents (the rerun only decodes)."""
        if not self.stopping:
            return
        last = self.plans[-1]
        if self.store is not None:
            self.save(last, LoopState(last.sampler.steps, {"latents": latents}), [], done=True)
        raise self.stopped(last, last.sampler.steps)

    def save(self, plan: StagePlan, state: LoopState, methods: list[Method], done: bool = False,
             handoff: bool = False) -> None:
        tensors = {f"loop.{k}": v for k, v in state.tensors.items()}
        tensors["generator"] = self.generator.get_state() if self.generator is not None else torch.empty(0)
        method_data = {}
        for m in methods:
            t, d = m.state_dict()
            tensors.update({f"method.{m.name}.{k}": v for k, v in t.items()})
            method_data[m.name] = d
        self.store.save({"recipe_name": self.recipe.name, "stage": plan.name, "stage_index": plan.index,
                         "step": state.step, "total_steps": plan.sampler.steps, "done": done, "handoff": handoff,
                         "loop": state.data, "methods": method_data}, tensors)

    def stopped(self, plan: StagePlan, step: int, handoff: bool = False):
        if self.store is None:
            return self.stop.stopped()
        where = f"stage {plan.name}, " if len(self.plans) > 1 else ""
        if handoff:
            what = f"the hand-off to stage {plan.name}"
        elif step < plan.sampler.steps:
            what = f"{where}step {step}/{plan.sampler.steps}"
        else:
            what = "the end of denoising"
        return Checkpointed(f"{self.stop.requested}: checkpointed at {what} -> {self.store.folder}/; "
                            "rerun the same command to resume")


def generate(recipe: Recipe, *, adapter: ModelAdapter | None = None, write: bool = True,
             progress: Progress | None = None, restart: bool = False, stop: StopRequests | None = None) -> Result:
    """Run ``recipe`` end to end; write the MP4 and its sidecar unless ``write`` is False.

    ``adapter``: a loaded model to use (it must have the recipe's load key); one is loaded and closed
    otherwise. ``restart``: discard a checkpoint of this output instead of resuming it. ``stop``: the caller's
    active :class:`StopRequests` (a batch worker's, so a signal that came between items is not lost); this run
    installs its own otherwise.
    """
    threads = torch.get_num_threads()
    try:
        return _generate(recipe, adapter, write, progress, restart, stop)
    finally:
        torch.set_num_threads(threads)  # runtime.threads is this run's, not the caller's process-wide setting


def _generate(recipe: Recipe, adapter: ModelAdapter | None, write: bool, progress: Progress | None,
              restart: bool, outer_stop: StopRequests | None) -> Result:
    start = time.perf_counter()
    timings: dict[str, Any] = {}
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    path = _output_file(recipe) if write else None  # every output problem is refused before loading
    store, resume = None, None
    if path is not None:
        sweep_stale(path.parent)  # temporaries of runs killed with -9 (dead pids on this host only)
        store = CheckpointStore(checkpoint_dir(path), recipe_hash(to_dict(recipe)))
        if restart:
            store.discard()
        resume = store.load()  # another recipe's checkpoint is refused here, before any loading
    checkpointing = store is not None and recipe.runtime.checkpoint != "off"
    own_adapter, writer = adapter is None, None
    # From here to publishing, SIGTERM/SIGUSR1 stop cleanly: a checkpoint (75) or nothing kept (143).
    with nullcontext(outer_stop) if outer_stop is not None else StopRequests(enabled=path is not None) as stop:
        try:
            if own_adapter:
                tick = time.perf_counter()
                adapter = load_adapter(recipe)
                timings["load_s"] = time.perf_counter() - tick
            if adapter.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(adapter.device)
            else:  # the sidecar's peak is this run's, not the process's (a batch runs many)
                timings["rss_peak_reset"] = _reset_rss_peak()
            adapter.check_run(recipe)
            _check_schedulers(adapter, recipe, checkpointing)
            steps = _Steps(recipe, progress, store if checkpointing else None, stop)
            latents = denoise_latents(adapter, recipe, timings=timings, steps=steps, resume=resume)
            tick = time.perf_counter()
            if path is not None:
                writer = _encode_video(adapter, recipe, latents, path, progress, steps)
            timings["decode_s"] = time.perf_counter() - tick
            timings["total_s"] = time.perf_counter() - start
            sidecar = _sidecar(recipe, path, latents, timings, adapter.device)
            if path is not None:
                steps.check_decode(latents)  # the last safe point: nothing is published yet
                _publish(writer, sidecar, recipe, latents)
                store.discard()  # finished: the checkpoint has served its purpose
        except torch.OutOfMemoryError as err:
            v = recipe.video
            raise OutOfMemoryError(f"video.num_frames: out of memory at {v.num_frames} frames {v.width}x{v.height}; "
                                   "use fewer frames or pixels, or set runtime.offload=model") from err
        finally:
            if writer is not None and not writer._closed:
                writer.abort()  # anything that stopped the run before publishing: no temporary video is left
            if own_adapter and adapter is not None:
                adapter.close()
    return Result(path, latents, sidecar)


def _sidecar(recipe: Recipe, path: Path | None, latents: torch.Tensor, timings: dict[str, Any],
             device: torch.device) -> dict[str, Any]:
    stages = timings.pop("stages", [])
    resumed = timings.pop("resumed_from", None)
    rss_reset = timings.pop("rss_peak_reset", False)
    sidecar = {
        "longvid_sidecar": 1,
        "output": str(path) if path else None,
        "recipe": to_dict(recipe),
        "seed": recipe.seed,
        "latent_shape": list(latents.shape),
        "seams": _seams(recipe),
        "stages": stages,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "peak_memory": _peak_memory(device, rss_reset),
        "environment": environment_info(device),
    }
    if resumed is not None:
        sidecar["resumed_from"] = resumed
    return sidecar


def _seams(recipe: Recipe) -> list[int]:
    """The pixel frames where a method's temporal window begins or ends in the video written (for ``longvid
    metrics``): from the methods of the stages that make the output's frames (a stage at another frame count is
    resampled in time, so its windows do not fall on the output's frames); latent frame ``l`` starts at pixel frame
    ``s·(l−1)+1`` for a VAE of temporal stride ``s`` whose first latent is one frame."""
    from longvid.recipe.stages import plan_stages

    spec = registry.model_spec(recipe.model.family)
    s = spec.temporal_stride
    frames = recipe.video.num_frames
    latent = {f for plan in plan_stages(recipe) if plan.num_frames == frames for name in plan.methods
              for f in registry.method_class(name).window_bounds(recipe.methods[name], frames, spec)}
    return sorted(s * (f - 1) + 1 for f in latent)


def _publish(writer: VideoWriter, sidecar: dict[str, Any], recipe: Recipe, latents: torch.Tensor) -> None:
    """Publish the finished video, its sidecar (and the latents when asked) together, or none of them: every
    file is a complete temporary first; if one cannot be published after another was, the published ones are
    taken back (a video without its sidecar would block every rerun). An I/O failure is one line (exit 2)."""
    path, overwrite = writer.path, recipe.output.overwrite
    temps: list[tuple[Path, Path]] = []  # (temporary, final) after the video
    published: list[Path] = []
    try:
        temps.append((prepare_sidecar(sidecar_path(path), sidecar), sidecar_path(path)))
        if recipe.output.save_latents:
            target = path.with_suffix(".latents.pt")
            tmp = partial_path(target)
            temps.append((tmp, target))
            with os.fdopen(create_exclusive(tmp), "wb") as f:
                torch.save(latents.cpu(), f)
        if recipe.output.preview:  # drawn from the finished, unpublished video: all files appear together or none
            from longvid.eval.compare import contact_sheet

            target = preview_path(path)
            tmp = partial_path(target)
            temps.append((tmp, target))
            contact_sheet(writer.tmp_path, tmp)
        writer.publish()
        published.append(path)
        for tmp, final in temps:
            publish(tmp, final, overwrite=overwrite)
            published.append(final)
    except (OSError, OutputExistsError) as err:
        for final in published:
            remove_quietly(final)
        reason = err.strerror or err if isinstance(err, OSError) else "a file appeared meanwhile"
        raise OutputError(f"output.dir: cannot write {path.name} and its sidecar ({reason}); nothing was "
                          "kept") from err
    finally:
        for tmp, _ in temps:
            remove_quietly(tmp)


def preview_path(video: Path) -> Path:
    """``out/cat.mp4`` -> ``out/cat.preview.png`` (``output.preview``)."""
    return video.with_name(f"{video.stem}.preview.png")


def planned_output(recipe: Recipe) -> Path:
    """Where ``recipe``'s video goes (its sidecar beside it), without checking anything."""
    prompt = recipe.prompt if isinstance(recipe.prompt, str) else recipe.prompt[min(recipe.prompt, key=int)]
    ext = ".mkv" if recipe.output.codec == "ffv1" else ".mp4"
    return output_path(recipe.output.dir, recipe.output.name, ext=ext, recipe=recipe.name or recipe.model.family,
                       prompt=prompt or "video", seed=recipe.seed, frames=recipe.video.num_frames,
                       width=recipe.video.width, height=recipe.video.height)


def _output_file(recipe: Recipe) -> Path:
    """The output path, checked before any work: the folder can be created and written and has room, the
    name is not a folder, and neither the video nor its sidecar exists (unless overwriting)."""
    path = planned_output(recipe)
    check_output_folder(path.parent, need_bytes=_estimate_bytes(recipe))
    extra = ([preview_path(path)] if recipe.output.preview else []) + \
        ([path.with_suffix(".latents.pt")] if recipe.output.save_latents else [])
    for target in [path, sidecar_path(path), *extra]:
        check_writable(target, recipe.output.overwrite)
    return path


def _estimate_bytes(recipe: Recipe) -> int:
    """A first, deliberately low estimate of what a run writes: the video (about 0.1 byte per pixel for x264/x265
    at the usual quality, 1.5 for lossless FFV1) plus, when checkpointing, a few copies of the latents."""
    v = recipe.video
    pixels = v.num_frames * v.height * v.width
    video = pixels * (1.5 if recipe.output.codec == "ffv1" else 0.1)
    spec = registry.model_spec(recipe.model.family)
    latents = spec.latent_channels * spec.latent_frames(v.num_frames) * (v.height // spec.vae_spatial) * (
        v.width // spec.vae_spatial) * 4
    return int(video + (4 * latents if recipe.runtime.checkpoint != "off" else 0))


def _encode_video(adapter: ModelAdapter, recipe: Recipe, latents: torch.Tensor, path: Path,
                  progress: Progress | None, steps: _Steps) -> VideoWriter:
    """Stream decoded chunks straight into the encoder (the whole video is never held in memory) and return
    the finished, not yet published writer. A stop request between chunks keeps the final latents as a
    checkpoint (the rerun only decodes); any failure removes the temporary file."""
    out = recipe.output
    pix_fmt = "bgr0" if out.codec == "ffv1" else "yuv420p"
    done, total = 0, recipe.video.num_frames
    writer = VideoWriter(path, fps=recipe.video.fps, codec=out.codec, crf=out.crf, preset=out.preset,
                         pix_fmt=pix_fmt, overwrite=out.overwrite, threads=out.threads)
    try:
        for chunk in adapter.decode_stream(latents, recipe.runtime):  # (B, 3, f, H, W) in [-1, 1]
            steps.check_decode(latents)
            writer.write(_cropped(chunk[0], out.crop))
            done += chunk.shape[2]
            if progress:
                progress("decode", min(done, total), total)
        writer.finish()
    except BaseException as err:
        writer.abort()
        if isinstance(err, OSError):
            raise OutputError(f"output.dir: writing {path.name} failed ({err.strerror or err}); nothing was "
                              "kept") from err
        raise
    return writer


def _cropped(frames: torch.Tensor, crop) -> torch.Tensor:
    """The centred ``[height, width]`` crop of frames ``(3, f, H, W)`` (``output.crop``), or the frames."""
    if crop is None:
        return frames
    h, w = frames.shape[-2:]
    top, left = (h - crop[0]) // 2, (w - crop[1]) // 2
    return frames[..., top:top + crop[0], left:left + crop[1]]


def _peak_memory(device: torch.device, rss_reset: bool) -> dict[str, Any]:
    """This run's peak: CUDA's allocator peak since the run started; on CPU the resident-set peak since the run
    started where Linux can reset it (``/proc/self/clear_refs``), else the process's (scope says which)."""
    if device.type == "cuda":
        return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device)}
    peak = _rss_peak() if rss_reset else None
    if peak is None:
        return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss_scope": "process"}
    return {"peak_rss_bytes": peak, "peak_rss_scope": "run"}


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak resident set size (VmHWM) to the current one (Linux >= 4.0)
        return True
    except OSError:
        return False  # no procfs (macOS) or not allowed: the sidecar then gives the process's peak


def _rss_peak() -> int | None:
    """VmHWM of this process in bytes (since the last reset), or None where procfs is absent."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except OSError:
        pass
    return None
