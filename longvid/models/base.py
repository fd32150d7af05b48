"""The ModelAdapter: everything longvid needs to know about a base model, in one object.

An adapter wraps the diffusers components of one model (loaded with the real ``from_pretrained``, or built
in code for ``tiny:``) and exposes them in the shape longvid's own loop and the methods need:

- ``encode(prompt, negative)`` -> :class:`Conditioning`; ``denoise(x, t, cond)`` -> guided prediction;
- ``latent_shape()``, ``make_scheduler()``, ``prepare_latents()``;
- ``decode_stream(latents)``: decoded frames chunk by chunk, never the whole video at once;
- ``attention_sites(kind)``: the self-attention modules a method may patch, each with a live
  :class:`~longvid.core.context.TokenLayout` (kept fresh by forward-pre-hooks the adapter installs);
- ``rope_module``: the module that computes rotary positions, or None.

Methods never test a model's class or name: what differs between models lives here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch

from longvid.core.context import AttentionSite
from longvid.errors import ModelLoadError
from longvid.models.specs import FamilySpec
from longvid.recipe.schema import ModelConfig, Recipe

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Conditioning:
    """Text conditioning for one generation.

    Attributes:
        positive: prompt embeddings, ``(1, seq, D)``; ``(F, seq, D)`` when a method set one per frame.
        negative: negative-prompt embeddings (same shape), or None without classifier-free guidance.
        keyframes: multi-prompt: ``{video frame: Conditioning}`` of each keyframe prompt, else None.
    """

    positive: torch.Tensor
    negative: torch.Tensor | None
    keyframes: dict[int, "Conditioning"] | None = None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("runtime.device: CUDA was requested but torch sees no GPU; set runtime.device=cpu")
    return device


class ModelAdapter:
    """Base class: loading and the parts shared by every family. Subclasses fill in the family specifics."""

    spec: ClassVar[FamilySpec]
    pipeline_class: ClassVar[str]  # the diffusers pipeline used as the component container
    denoiser_names: ClassVar[tuple[str, ...]]  # component names of the denoiser network(s)
    op_processor: ClassVar[type]  # processor class that routes a site's attention core through an op

    def __init__(self, pipe: Any, recipe: Recipe, device: torch.device):
        self.pipe = pipe
        self.recipe = recipe
        self.device = device
        self._hooks: list[Any] = []
        self._sites: list[AttentionSite] | None = None
        self.attention_sites()  # find the sites and start keeping their layouts current

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, recipe: Recipe) -> "ModelAdapter":
        """Load the model named by ``recipe.model`` onto ``recipe.runtime.device``."""
        device = pick_device(recipe.runtime.device)
        dtype = cls._denoiser_dtype(recipe.model, device)
        dtypes = {name: dtype for name in cls.denoiser_names}
        dtypes["text_encoder"] = _DTYPES[recipe.model.text_encoder_dtype] if recipe.model.text_encoder_dtype else dtype
        dtypes["vae"] = _DTYPES[recipe.model.vae_dtype or "float32"]
        dtypes["default"] = dtype
        pipe = cls._load_pipeline(recipe.model, dtypes)
        if recipe.runtime.offload == "model" and device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)
        elif recipe.runtime.offload == "sequential" and device.type == "cuda":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()  # no dropout: modules built in code (tiny:) start in training mode, unlike from_pretrained
        adapter = cls(pipe, recipe, device)
        adapter.check_loaded()
        return adapter

    @classmethod
    def _denoiser_dtype(cls, model: ModelConfig, device: torch.device) -> torch.dtype:
        if model.dtype:
            return _DTYPES[model.dtype]
        return _DTYPES[cls.spec.cuda_dtype] if device.type == "cuda" else torch.float32

    @classmethod
    def _load_pipeline(cls, model: ModelConfig, dtypes: dict[str, torch.dtype]):
        if model.path.startswith("tiny:"):
            from longvid.models import tiny

            pipe = tiny.build(model.path.removeprefix("tiny:"))
            for name, module in pipe.components.items():
                if isinstance(module, torch.nn.Module):
                    module.to(dtypes.get(name, dtypes["default"]))
            return pipe
        import diffusers

        pipeline_cls = getattr(diffusers, cls.pipeline_class)
        return from_pretrained(pipeline_cls, model.path, key="model.path", dtype=dtypes, revision=model.revision,
                               local_files_only=model.local_files_only, **cls._extra_components(model, dtypes))

    @classmethod
    def _extra_components(cls, model: ModelConfig, dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        """Components loaded separately and passed to the pipeline (AnimateDiff's MotionAdapter)."""
        return {}

    def check_loaded(self) -> None:
        """Raise a ``RecipeError`` if the loaded weights contradict the recipe (checked after loading)."""

    # ------------------------------------------------------------------------------ generation API

    @property
    def denoisers(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipe, n, None) for n in self.denoiser_names) if m is not None]

    @property
    def dtype(self) -> torch.dtype:
        return self.denoisers[0].dtype

    @property
    def rope_module(self) -> torch.nn.Module | None:
        return None

    def latent_frames(self, num_frames: int) -> int:
        return self.spec.latent_frames(num_frames)

    def make_scheduler(self):
        """A fresh scheduler (the loop's state must not leak between generations), per ``recipe.sampler``."""
        import diffusers

        sampler = self.recipe.sampler
        base = self.pipe.scheduler
        cls = getattr(diffusers, sampler.scheduler) if sampler.scheduler else type(base)
        overrides = dict(sampler.scheduler_config)
        if sampler.flow_shift is not None:
            overrides["flow_shift"] = sampler.flow_shift
        return cls.from_config(base.config, **overrides)

    def step_kwargs(self, scheduler, generator: torch.Generator) -> dict[str, Any]:
        """Extra ``scheduler.step`` arguments it accepts (DDIM's eta and generator)."""
        import inspect

        params = inspect.signature(scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = self.recipe.sampler.eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def attention_sites(self, kind: str | None = None) -> list[AttentionSite]:
        if self._sites is None:
            self._sites = self._find_sites()
            self._install_layout_hooks()
        return [s for s in self._sites if kind is None or s.kind == kind]

    def install_op(self, site: AttentionSite, op) -> Callable[[], None]:
        """Route ``site``'s attention core through ``op``; returns the undo (restores the old processor)."""
        return self.install_processor(site, self.op_processor(site, op))

    @staticmethod
    def install_processor(site: AttentionSite, processor) -> Callable[[], None]:
        """Set a diffusers processor on ``site.module``; returns the undo."""
        previous = site.module.processor
        site.module.set_processor(processor)
        return lambda: site.module.set_processor(previous)

    @contextlib.contextmanager
    def prepared(self, num_frames: int) -> Iterator[None]:
        """Model-side preparation for a generation of ``num_frames`` (e.g. position tables); always undone."""
        yield

    def close(self) -> None:
        """Remove the layout hooks (the model is then exactly as loaded)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._sites = None

    # Subclasses implement:
    def encode(self, prompt: str, negative: str) -> Conditioning: ...
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]: ...
    def prepare_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor: ...
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...
    def decode_stream(self, latents: torch.Tensor) -> Iterator[torch.Tensor]: ...
    def _find_sites(self) -> list[AttentionSite]: ...
    def _install_layout_hooks(self) -> None: ...

    @property
    def guidance(self) -> float:
        return float(self.recipe.sampler.guidance_scale)

    @property
    def do_cfg(self) -> bool:
        return self.guidance > 1.0


def from_pretrained(cls, path: str, *, key: str, **kwargs):
    """``cls.from_pretrained(path, ...)`` with a one-line error naming ``key`` when the model is missing."""
    local = Path(path).expanduser()
    if local.exists() and local.is_dir() and not any((local / f).exists() for f in ("model_index.json", "config.json")):
        raise ModelLoadError(f"{key}: '{path}' is a folder but not a diffusers model (no model_index.json or "
                             f"config.json); point it at a folder written by save_pretrained or a hub snapshot")
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{key}: '{path}' is a file; expected a hub id or a diffusers model folder")
    if not local.exists() and (local.is_absolute() or path.startswith((".", "~"))):  # a path, not a hub id
        raise ModelLoadError(f"{key}: no folder '{path}'; set {key} to a local diffusers model folder (written by "
                             f"save_pretrained or `hf download <repo id> --local-dir <folder>`) or to a hub id")
    try:
        return cls.from_pretrained(str(local) if local.exists() else path, **kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or kwargs.get("local_files_only")
        how = ("it is not in the local Hugging Face cache and the hub is offline; download it with "
               f"`hf download {path}` on a machine with internet, or set {key} to a local folder") if offline else \
              f"download it with `hf download {path}` or set {key} to a local folder"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{key}: cannot load '{path}' ({first[:160]}); {how}") from err
