"""Pyramid Flow as a longvid model family: loading, text, the autoregressive loop through the engine's loop seam,
and the streamed causal-VAE decode.

The engine draws the full-size noise from the recipe's generator (as for every family) and hands it over; the
family's ``sample_stage`` owns the loop (``loop.generate_units``) and reports every finished latent unit as a
"step", so progress, checkpoints (``runtime.checkpoint``: the finished units, the unit noise and the generator)
and resume work unchanged, counted in units. No attention method applies to this family (none declares it), so
the adapter exposes no attention sites.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from longvid.core.sampler import LoopState
from longvid.errors import ModelLoadError
from longvid.models.base import Conditioning, ModelAdapter
from longvid.models.specs import PYRAMID_FLOW, PyramidFlowOptions
from longvid.recipe.schema import ModelConfig, Recipe, RuntimeConfig, SamplerConfig


class PyramidPipeline:
    """The loaded components in a pipeline-shaped container (``components``, ``to``, offload) for the adapter base.

    The loop calls the DiT's and the VAE's submodules itself (never their ``forward``), so diffusers' model offload
    hooks would never fire: ``runtime.offload: model`` is done here by phases instead (:meth:`phase`), and
    ``sequential`` by accelerate's per-module hooks, which do fire on every submodule call.
    """

    #: the components each phase runs
    PHASES = {"text": ("text_encoder", "text_encoder_2", "text_encoder_3"), "dit": ("dit",), "vae": ("vae",)}

    def __init__(self, kind: str, dit: torch.nn.Module, vae: torch.nn.Module, **text: Any):
        self.kind, self.dit, self.vae, self.text = kind, dit, vae, text
        self.offload_device: torch.device | None = None  # set by enable_model_cpu_offload

    @property
    def components(self) -> dict[str, Any]:
        return {"dit": self.dit, "vae": self.vae, **self.text}

    def to(self, device) -> "PyramidPipeline":
        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(device)
        return self

    def enable_model_cpu_offload(self, device=None) -> None:
        """Offload per phase: every component waits in CPU memory and only the running phase's sit on ``device``
        (the text encoders while prompts encode, the DiT while units generate, the VAE while it encodes or
        decodes), so the device holds the largest component, not all of them."""
        self.to("cpu")
        self.offload_device = torch.device(device or "cuda")

    def enable_sequential_cpu_offload(self, device=None) -> None:
        """Offload per layer (accelerate's ``cpu_offload`` on every component): the weights stay in CPU memory and
        each submodule's are brought to ``device`` for its own call — the least device memory, the slowest."""
        from accelerate import cpu_offload

        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                cpu_offload(module, execution_device=torch.device(device or "cuda"))

    def phase(self, name: str) -> None:
        """With per-phase offload, bring phase ``name``'s components to the device and every other one back to CPU
        memory (those first, so the two never sit on the device together); otherwise nothing."""
        if self.offload_device is None:
            return
        running = self.PHASES[name]
        modules = [(k, m) for k, m in self.components.items() if isinstance(m, torch.nn.Module)]
        for key, module in modules:
            if key not in running:
                module.to("cpu")
        for key, module in modules:
            if key in running:
                module.to(self.offload_device)


class _UnitSchedule:
    """What the engine asks of a scheduler, for a loop counted in units (the pyramid schedule is the loop's own)."""

    def set_timesteps(self, steps: int, device=None) -> None:
        self.timesteps = torch.arange(steps, device=device)


class PyramidFlowAdapter(ModelAdapter):
    spec = PYRAMID_FLOW
    pipeline_class = ""
    denoiser_names = ("dit",)
    op_processor = None
    vae_tile: int = PyramidFlowOptions.vae_tile
    """The VAE tile (pixels, 0 = none) of the current run: ``model.options`` is read per run, not at load, so
    :meth:`check_run` (called before every run, also one that only decodes a checkpoint) takes it from the recipe."""
    prompt_suffix: bool = PyramidFlowOptions.prompt_suffix
    """Whether the current run appends the official quality suffix to its prompts (set by :meth:`check_run`)."""

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def _load_pipeline(cls, model: ModelConfig, dtypes: dict[str, torch.dtype]):
        if model.path.startswith("tiny:"):
            return super()._load_pipeline(model, dtypes)
        from longvid.models.pyramid_flow.load import load_folder

        variant = model.variant or cls.spec.variants[0]
        options = PyramidFlowOptions(**model.options)
        files = {name: Path(value).expanduser() if value is not None else None
                 for name, value in (("transformer_file", options.transformer_file), ("vae_file", options.vae_file))}
        root = _checkpoint_folder(model, variant, dit=files["transformer_file"] is None, vae=files["vae_file"] is None)
        parts = load_folder(root, variant, dtypes["dit"], dtypes["text_encoder"], dtypes["vae"], **files)
        text = {k: v for k, v in parts.items() if k.startswith(("text_encoder", "tokenizer"))}
        return PyramidPipeline(parts["kind"], parts["dit"], parts["vae"], **text)

    def check_run(self, recipe: Recipe) -> None:
        super().check_run(recipe)
        options = PyramidFlowOptions(**recipe.model.options)
        self.vae_tile, self.prompt_suffix = options.vae_tile, options.prompt_suffix

    # ---------------------------------------------------------------------------------- conditioning

    def encode(self, prompt: str, negative: str, sampler: SamplerConfig) -> Conditioning:
        from longvid.models.pyramid_flow.text import PROMPT_SUFFIX, encode

        texts = [prompt + (PROMPT_SUFFIX if self.prompt_suffix else ""), negative]  # the official suffix: prompt only
        self.pipe.phase("text")
        both = encode(self.pipe.text, texts, self.device)
        pos = type(both)(both.text[:1], both.mask[:1], both.pooled[:1])
        neg = type(both)(both.text[1:], both.mask[1:], both.pooled[1:])
        return Conditioning(pos, neg)

    # ---------------------------------------------------------------------------------- the loop

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        return (1, 16, self.latent_frames(num_frames), height // 8, width // 8)

    def prepare_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor:
        return noise

    def make_scheduler(self, sampler: SamplerConfig):
        return _UnitSchedule()

    @staticmethod
    def step_kwargs(scheduler, generator: torch.Generator, sampler: SamplerConfig) -> dict[str, Any]:
        return {}

    def predict(self, x, t, embeds, expert: int = 0):
        raise NotImplementedError("Pyramid Flow runs its own loop (sample_stage)")

    def sample_stage(self, job) -> torch.Tensor:
        from longvid.models.pyramid_flow.dit_flux import flux_forward
        from longvid.models.pyramid_flow.dit_sd3 import sd3_forward
        from longvid.models.pyramid_flow.loop import UnitSettings, UnitState, generate_units

        recipe = job.recipe
        options = PyramidFlowOptions(**recipe.model.options)
        sampler = recipe.sampler
        settings = UnitSettings(image_steps=tuple(options.image_steps),
                                video_steps=tuple(options.video_steps or [sampler.steps] * 3),
                                guidance=float(sampler.guidance_scale), video_guidance=options.video_guidance_scale,
                                history_window=options.history_window)
        forward = flux_forward if self.pipe.kind == "miniflux" else sd3_forward
        dit = functools.partial(forward, self.pipe.dit)
        condition = _unit_conditions(job.cond, settings.guidance > 0)
        resume = None
        if job.resume is not None:
            resume = UnitState(job.resume.step, job.resume.tensors["latents"], job.resume.tensors["noise"])

        def on_unit(done: int, capture) -> None:
            job.ctx.step = done
            if job.on_step is not None:
                job.on_step(done, lambda: _loop_state(capture()))

        with torch.no_grad():
            first = None
            if recipe.image is not None and resume is None:  # i2v: the image is unit 0 (drawn after the noise)
                first = self.encode_image(recipe.image, recipe.video.height, recipe.video.width, job.generator,
                                          tile=options.vae_tile)
            self.pipe.phase("dit")
            return generate_units(dit, condition, tuple(job.latents.shape), job.generator, settings,
                                  dtype=self.pipe.dit.dtype, noise=job.latents, resume=resume, on_unit=on_unit,
                                  device=self.device, first=first).float()

    @torch.no_grad()
    def encode_image(self, path: str, height: int, width: int, generator: torch.Generator,
                     tile: int | None = None) -> torch.Tensor:
        """The normalised latent ``(1, 16, 1, h, w)`` of an image: scaled to cover ``height × width``, centre-cropped,
        encoded with a posterior sample from ``generator`` (as the official i2v samples the posterior), in VAE tiles
        of ``tile`` pixels (None: the run's ``model.options.vae_tile``) when the image is larger, as the official
        i2v tile-encodes its 768p images."""
        import numpy as np
        from PIL import Image

        from longvid.models.pyramid_flow.vae import LATENT_STATS, normalize

        with Image.open(Path(path).expanduser()) as im:
            im = im.convert("RGB")
            scale = max(width / im.width, height / im.height)
            size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
            im = im.resize(size, Image.BICUBIC)
            left, top = (size[0] - width) // 2, (size[1] - height) // 2
            pixels = np.asarray(im.crop((left, top, left + width, top + height)), dtype=np.float32)
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, None] / 127.5 - 1.0  # (1, 3, 1, H, W) in [-1, 1]
        self.pipe.phase("vae")
        vae = self.pipe.vae
        weight = next(vae.parameters())  # its dtype (the device may be meta under sequential offload)
        z = vae.encode(x.to(self.device, weight.dtype), generator=generator,
                       tile=self.vae_tile if tile is None else tile)
        return normalize(z.float(), LATENT_STATS[self.pipe.kind])

    # ---------------------------------------------------------------------------------- VAE streams

    @torch.no_grad()
    def decode_stream(self, latents: torch.Tensor, runtime: RuntimeConfig | None = None) -> Iterator[torch.Tensor]:
        """Frames in [-1, 1], ``(B, 3, f, H, W)``: the image frame and the first video latent (9 frames), then 8
        frames per latent (the VAE's exact chunked decode, one latent at a time), in spatial tiles of the run's
        ``model.options.vae_tile`` when the frame is larger (each tile streamed with its own carry)."""
        from longvid.models.pyramid_flow.vae import LATENT_STATS, denormalize

        self.pipe.phase("vae")
        vae = self.pipe.vae
        weight = next(vae.parameters())  # its dtype (the device may be meta under sequential offload)
        z = denormalize(latents.float(), LATENT_STATS[self.pipe.kind]).to(self.device, weight.dtype)
        for chunk in vae.decode_chunks(z, window=1, tile=self.vae_tile):
            yield chunk.float()

    def encode_stream(self, chunks: Iterable[torch.Tensor], runtime: RuntimeConfig | None = None) -> torch.Tensor:
        raise NotImplementedError("Pyramid Flow has no refine stages")

    # -------------------------------------------------------------------------------- method seams

    def _find_sites(self):
        return []  # no attention method supports this family

    def _install_layout_hooks(self) -> None:
        return None


def _loop_state(state) -> LoopState:
    return LoopState(state.units, {"latents": state.latents, "noise": state.noise})


def _unit_conditions(cond: Conditioning, cfg: bool):
    """``condition(u)``: the prompt of unit ``u`` (``--prompt-at`` keyframes switch at the unit holding their frame:
    frame 0 is unit 0, frames 8u−7 … 8u are unit u), batched ``[uncond, cond]`` when guided."""
    from longvid.models.pyramid_flow.loop import TextCondition

    def batch(c: Conditioning) -> TextCondition:
        if not cfg:
            return c.positive
        pos, neg = c.positive, c.negative
        return TextCondition(torch.cat([neg.text, pos.text]), torch.cat([neg.mask, pos.mask]),
                             torch.cat([neg.pooled, pos.pooled]))

    if not cond.keyframes:
        single = batch(cond)
        return lambda u: single
    starts = sorted(((frame + 7) // 8, batch(c)) for frame, c in cond.keyframes.items())

    def condition(u: int) -> TextCondition:
        return [c for start, c in starts if start <= u][-1] if starts[0][0] <= u else starts[0][1]

    return condition


def _checkpoint_folder(model: ModelConfig, variant: str, dit: bool = True, vae: bool = True) -> Path:
    """A local official-layout folder, or the hub snapshot of ``model.path`` (only the files this run needs: without
    ``dit`` / ``vae``, when single files replace them, only the variant's / the VAE's config.json)."""
    local = Path(model.path).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or model.path.startswith((".", "~")):
        raise ModelLoadError(f"model.path: no folder '{model.path}'; point it at a rain1011/pyramid-flow-* download")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model.path, revision=model.revision, local_files_only=model.local_files_only,
                                      allow_patterns=[f"{variant}/*" if dit else f"{variant}/config.json",
                                                      "causal_video_vae/*" if vae else "causal_video_vae/config.json",
                                                      "text_encoder*/*", "tokenizer*/*"]))
    except Exception as err:  # noqa: BLE001 - offline, missing repo, network: one line either way
        first = " ".join(str(err).split())[:200]
        raise ModelLoadError(f"model.path: cannot get '{model.path}' ({first}); download it with `hf download "
                             f"{model.path}` or set model.path to a local folder") from None
