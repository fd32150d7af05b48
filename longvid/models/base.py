"""The ModelAdapter: everything longvid needs to know about a base model, in one object.

An adapter wraps the diffusers components of one model (loaded with the real ``from_pretrained``, or built
in code for ``tiny:``) and holds only what loading fixed: its *load key* (model path, variant, dtypes,
device, offload). Everything else comes from the run's recipe at each call, so one loaded model serves many
runs bit-exactly (batch, compare, probe). It exposes the components in the shape longvid's loop and the
methods need:

- ``encode(prompt, negative, sampler)`` -> :class:`Conditioning`;
- ``predict(x, t, embeds, expert)`` -> the *unguided* prediction of one denoiser (guidance is a wrapper,
  :mod:`longvid.core.guidance`); ``expert(t)`` picks the denoiser (Wan 2.2's two experts);
- ``latent_shape()``, ``make_scheduler(sampler)``, ``prepare_latents()``;
- ``decode_stream(latents)`` / ``encode_stream(chunks)``: frames chunk by chunk, never the whole video;
- ``sample_stage(job)``: the loop of one stage (:mod:`longvid.core.sampler`); a family may own it;
- ``attention_sites(kind)``: the attention modules a method may patch, each with its denoiser, per-denoiser
  layer index and a live :class:`~longvid.core.context.TokenLayout`;
- ``rope_modules``: ``{denoiser: module}`` computing rotary positions, one per expert.

Methods never test a model's class or name: what differs between models lives here.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch

from longvid.core.context import AttentionSite
from longvid.core.hooks import add_hook, pre_forward_hook
from longvid.errors import MethodError, ModelLoadError, Problem, RecipeError
from longvid.models.specs import FamilySpec
from longvid.recipe.schema import ModelConfig, Recipe, RuntimeConfig, SamplerConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Recipe keys fixed when a model is loaded; every other key is read per run.
LOAD_KEYS = ("model.family", "model.path", "model.motion_adapter", "model.revision", "model.variant", "model.dtype",
             "model.text_encoder_dtype", "model.vae_dtype", "model.local_files_only", "runtime.device",
             "runtime.offload", "runtime.layerwise_casting", "runtime.attention_backend", "runtime.compile")
#: ``model.options`` entries fixed at load too (Pyramid Flow's single-file DiT and VAE): ``model.options.<name>``.
LOAD_OPTIONS = ("transformer_file", "vae_file")


def load_key(recipe: Recipe) -> dict[str, Any]:
    """The values of :data:`LOAD_KEYS` in ``recipe`` (``runtime.device: auto`` resolved to the real device)."""
    key = {}
    for dotted in LOAD_KEYS:
        section, name = dotted.split(".")
        key[dotted] = getattr(getattr(recipe, section), name)
    for name in LOAD_OPTIONS:
        key[f"model.options.{name}"] = (recipe.model.options or {}).get(name)
    key["runtime.device"] = str(pick_device(recipe.runtime.device))
    return key


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
    """``runtime.device``: ``auto`` is CUDA when there is a GPU. A CUDA device without an index is, under torchrun
    (``LOCAL_RANK``), this process's own GPU: one worker per GPU, never all of them on GPU 0."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("runtime.device: CUDA was requested but torch sees no GPU; set runtime.device=cpu")
    local = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local is not None and local.isdigit():
        if int(local) >= torch.cuda.device_count():
            raise ModelLoadError(f"runtime.device: LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                                 "GPU(s); start at most that many processes per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", int(local))
    return device


def _set_attention_backend(modules: list, backend: str) -> None:
    """``set_attention_backend`` on each module, this model's processors only: diffusers also makes the backend
    the process-wide default, which would change every other model loaded in this process (a batch, a compare, a
    test session), so that default is put back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    try:
        for module in modules:
            if module is not None:
                module.set_attention_backend(backend)
    except (RuntimeError, ValueError, ImportError) as err:  # e.g. flash-attn not installed
        raise ModelLoadError(f"runtime.attention_backend: {backend} cannot run here ({' '.join(str(err).split())}); "
                             "remove it or install its package") from None
    finally:
        _AttentionBackendRegistry.set_active_backend(default)


def vae_device(vae: torch.nn.Module, execution: torch.device) -> torch.device:
    """Where a VAE's inputs go: where its weights are, or the execution device when accelerate's sequential
    offload keeps them on the meta device until each layer runs (longvid streams through the VAE's submodules)."""
    weight = next(vae.parameters(), None)
    return execution if weight is not None and weight.device.type == "meta" else weight.device if weight is not None \
        else execution


def uses_cfg(sampler: SamplerConfig) -> bool:
    """True when the run uses classifier-free guidance (so the negative prompt must be encoded): as in the
    diffusers pipelines, ``guidance_scale > 1`` alone decides, for every expert."""
    return sampler.guidance_scale is not None and sampler.guidance_scale > 1.0


class ModelAdapter:
    """Base class: loading and the parts shared by every family. Subclasses fill in the family specifics."""

    spec: ClassVar[FamilySpec]
    pipeline_class: ClassVar[str]  # the diffusers pipeline used as the component container
    denoiser_names: ClassVar[tuple[str, ...]]  # component names of the denoiser network(s)
    op_processor: ClassVar[type]  # processor class that routes a site's attention core through an op
    batched_cfg: ClassVar[bool] = False  # guidance runs cond and uncond as one batch (else two calls)

    def __init__(self, pipe: Any, key: dict[str, Any], device: torch.device):
        self.pipe = pipe
        self.load_key = dict(key)
        self.device = device
        self._hooks: list[Callable[[], None]] = []
        self._sites: list[AttentionSite] | None = None
        self._owners: dict[int, str] = {}  # id(site module) -> method that patched it
        self.compute_dtypes: dict[str, torch.dtype] = {}  # set by load(); empty for adapters built by hand
        self.attention_sites()  # find the sites and start keeping their layouts current

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, recipe: Recipe) -> "ModelAdapter":
        """Load the model named by ``recipe.model`` onto ``recipe.runtime.device``; nothing else is read."""
        device = pick_device(recipe.runtime.device)
        pipe = cls._load_pipeline(recipe.model, cls._dtypes(recipe.model, device))
        return cls._wrap(pipe, recipe, device)

    @classmethod
    def from_pipeline(cls, pipe: Any, recipe: Recipe) -> "ModelAdapter":
        """Wrap diffusers components built in memory (benchmarks, real-size random-weight checks) exactly as
        :meth:`load` wraps loaded ones: per-component dtypes, device or offload, eval mode, load key."""
        device = pick_device(recipe.runtime.device)
        _cast(pipe, cls._dtypes(recipe.model, device))
        return cls._wrap(pipe, recipe, device)

    @classmethod
    def _wrap(cls, pipe: Any, recipe: Recipe, device: torch.device) -> "ModelAdapter":
        dtypes = cls._dtypes(recipe.model, device)
        storage = recipe.runtime.layerwise_casting
        if storage != "none":  # before any move: the fp8 copies are what goes to the device
            for name, module in ((n, getattr(pipe, n, None)) for n in cls.denoiser_names):
                if module is not None:
                    module.enable_layerwise_casting(storage_dtype=getattr(torch, storage), compute_dtype=dtypes[name])
        backend = recipe.runtime.attention_backend
        if backend is not None:  # before longvid's processors: they inherit it from the ones they replace
            _set_attention_backend([getattr(pipe, n, None) for n in cls.denoiser_names], backend)
        offload = recipe.runtime.offload
        if offload == "model" and device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential" and device.type == "cuda":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
            if offload == "group" and device.type == "cuda":  # blocks wait in (pinned) CPU memory, one group onloaded
                for module in (getattr(pipe, n, None) for n in cls.denoiser_names):
                    if module is not None:
                        module.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                                    offload_type="block_level", num_blocks_per_group=1,
                                                    use_stream=True)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()  # no dropout: modules built in code (tiny:) start in training mode, unlike from_pretrained
        if recipe.runtime.compile == "blocks":  # last: what is compiled is the placed, cast model
            for module in (getattr(pipe, n, None) for n in cls.denoiser_names):
                if module is not None:
                    module.compile_repeated_blocks(fullgraph=False)
        adapter = cls(pipe, load_key(recipe), device)
        # what each component computes in (with fp8 storage its weights are not: inputs are cast to this instead)
        adapter.compute_dtypes = dtypes
        adapter.check_loaded()
        return adapter

    @classmethod
    def _dtypes(cls, model: ModelConfig, device: torch.device) -> dict[str, torch.dtype]:
        """dtype per pipeline component (``default`` for the rest): denoisers, text encoder, an fp32 VAE."""
        dtype = _DTYPES[model.dtype] if model.dtype else (
            _DTYPES[cls.spec.cuda_dtype] if device.type == "cuda" else torch.float32)
        dtypes = {name: dtype for name in cls.denoiser_names}
        dtypes["text_encoder"] = _DTYPES[model.text_encoder_dtype] if model.text_encoder_dtype else dtype
        dtypes["vae"] = _DTYPES[model.vae_dtype or "float32"]
        dtypes["default"] = dtype
        return dtypes

    @classmethod
    def _load_pipeline(cls, model: ModelConfig, dtypes: dict[str, torch.dtype]):
        if model.path.startswith("tiny:"):
            from longvid.models import tiny

            pipe = tiny.build(model.path.removeprefix("tiny:"))
            _cast(pipe, dtypes)
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
        """Raise a ``LongvidError`` if the loaded weights are unusable (checked once, after loading)."""

    def check_run(self, recipe: Recipe) -> None:
        """Refuse ``recipe`` before any work if this model cannot run it: a different load key (one line naming
        the first differing key), or what only the loaded weights can tell (subclasses extend)."""
        wanted = load_key(recipe)
        for key, value in self.load_key.items():
            if wanted[key] != value:
                raise RecipeError([Problem(key, f"this loaded model has {key}={value!r} but the recipe asks for "
                                                f"{wanted[key]!r}; load a model for this recipe")])

    # ------------------------------------------------------------------------------ generation API

    @property
    def denoisers(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipe, n, None) for n in self.denoiser_names) if m is not None]

    @property
    def named_denoisers(self) -> dict[str, torch.nn.Module]:
        """``{component name: denoiser}`` (``transformer``, ``transformer_2``; ``unet``), in :attr:`denoisers` order."""
        return {n: m for n in self.denoiser_names if (m := getattr(self.pipe, n, None)) is not None}

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The ``(frames, rows, columns)`` token grid a DiT's 3D attention sees for a video of this size."""
        raise NotImplementedError(f"{self.spec.name} has no 3D token grid")

    @property
    def dtype(self) -> torch.dtype:
        return self.denoisers[0].dtype

    @property
    def latent_dtype(self) -> torch.dtype:
        """dtype the initial noise is drawn in (the loop then keeps the scheduler's float32 latents)."""
        return torch.float32

    @property
    def rope_modules(self) -> dict[str, torch.nn.Module]:
        """``{denoiser name: rotary-position module}`` for every denoiser that has one."""
        return {}

    def latent_frames(self, num_frames: int) -> int:
        return self.spec.latent_frames(num_frames)

    def expert(self, t: torch.Tensor) -> int:
        """Index into :attr:`denoisers` of the denoiser that handles timestep ``t`` (0 for one-denoiser models)."""
        return 0

    def make_scheduler(self, sampler: SamplerConfig):
        """A fresh scheduler (the loop's state must not leak between generations) for ``sampler``."""
        import diffusers

        base = self.pipe.scheduler
        cls = getattr(diffusers, sampler.scheduler) if sampler.scheduler else type(base)
        overrides = dict(sampler.scheduler_config)
        if sampler.flow_shift is not None:
            overrides["flow_shift"] = sampler.flow_shift
        return cls.from_config(base.config, **overrides)

    @staticmethod
    def step_kwargs(scheduler, generator: torch.Generator, sampler: SamplerConfig) -> dict[str, Any]:
        """Extra ``scheduler.step`` arguments it accepts (DDIM's eta and generator)."""
        params = inspect.signature(scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = sampler.eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def sample_stage(self, job) -> torch.Tensor:
        """Turn one stage's starting latents into its result: the default loop (:func:`longvid.core.sampler.
        run_stage`). A family with its own schedule (autoregressive, pyramidal) overrides this and keeps the
        job's contract: report each step with ``job.on_step`` and honour ``job.resume``."""
        from longvid.core.sampler import run_stage

        return run_stage(job)

    def attention_sites(self, kind: str | None = None) -> list[AttentionSite]:
        if self._sites is None:
            self._sites = self._find_sites()
            self._install_layout_hooks()
        return [s for s in self._sites if kind is None or s.kind == kind]

    def install_op(self, site: AttentionSite, op, owner: str) -> Callable[[], None]:
        """Route ``site``'s attention core through ``op`` for method ``owner``; returns the undo."""
        return self.install_processor(site, self.op_processor(site, op), owner)

    def install_processor(self, site: AttentionSite, processor, owner: str) -> Callable[[], None]:
        """Set a diffusers processor on ``site.module`` for method ``owner``; returns the undo.

        The processor inherits the attention backend and context-parallel config of the one it replaces, so
        ``set_attention_backend`` and context parallelism keep working under longvid's processors.
        """
        release = self.claim(site, owner)
        previous = site.module.processor
        for attr in ("_attention_backend", "_parallel_config"):
            if hasattr(previous, attr) and getattr(previous, attr) is not None:
                setattr(processor, attr, getattr(previous, attr))
        site.module.set_processor(processor)

        def undo():
            site.module.set_processor(previous)
            release()

        return undo

    def claim(self, site: AttentionSite, owner: str) -> Callable[[], None]:
        """Mark ``site`` as patched by method ``owner`` (one attention method per site); returns the release.

        A second method on the same site is refused: its changes would silently replace the first one's.
        """
        return self.claim_module(site.module, f"attention site {site.name}", owner)

    def claim_module(self, module: torch.nn.Module, what: str, owner: str) -> Callable[[], None]:
        """Mark any patched module (an attention site, a RoPE module) as method ``owner``'s; returns the release."""
        holder = self._owners.get(id(module))
        if holder is not None and holder != owner:
            raise MethodError(f"methods.{owner}: {what} is already patched by methods.{holder}; use one method "
                              f"per site (scope them to different stages)")
        if holder == owner:
            return lambda: None
        self._owners[id(module)] = owner
        return lambda: self._owners.pop(id(module), None)

    @contextlib.contextmanager
    def prepared(self, num_frames: int) -> Iterator[None]:
        """Model-side preparation for a generation of ``num_frames`` (e.g. position tables); always undone."""
        yield

    def close(self) -> None:
        """Remove the layout hooks (the model is then exactly as loaded)."""
        while self._hooks:
            self._hooks.pop()()
        self._sites = None

    def _add_hook(self, module: torch.nn.Module, name: str, fn: Callable) -> None:
        """A named diffusers pre-forward hook ``fn(module, args, kwargs)`` removed by :meth:`close`."""
        self._hooks.append(add_hook(module, name, pre_forward_hook(fn)))

    # Subclasses implement:
    def encode(self, prompt: str, negative: str, sampler: SamplerConfig) -> Conditioning: ...
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]: ...
    def prepare_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor: ...
    def predict(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, expert: int = 0) -> torch.Tensor: ...
    def decode_stream(self, latents: torch.Tensor, runtime: RuntimeConfig) -> Iterator[torch.Tensor]: ...
    def encode_stream(self, chunks: Iterable[torch.Tensor], runtime: RuntimeConfig) -> torch.Tensor: ...
    def _find_sites(self) -> list[AttentionSite]: ...
    def _install_layout_hooks(self) -> None: ...


def _cast(pipe: Any, dtypes: dict[str, torch.dtype]) -> None:
    """Cast components built in code as ``from_pretrained(torch_dtype=...)`` casts loaded ones: each to its dtype,
    except what a model keeps in float32 (``_keep_in_fp32_modules``, matched on dotted name parts: Wan's RoPE
    tables, time embedder, norms and modulation), which goes straight to float32 (RoPE tables never pass through
    bf16)."""
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        dtype = dtypes.get(name, dtypes["default"])
        keep = set(getattr(module, "_keep_in_fp32_modules", None) or [])
        for sub_name, sub in module.named_modules():
            parts = set(sub_name.split("."))
            for table in (sub._parameters, sub._buffers):
                for key, t in table.items():
                    if t is not None and t.is_floating_point():
                        target = torch.float32 if keep & (parts | {key}) else dtype
                        if table is sub._parameters:
                            t.data = t.data.to(target)
                        else:
                            table[key] = t.to(target)


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
        first = " ".join(str(err).split()) or type(err).__name__
        if len(first) > 200:  # cut at a word, never mid-word
            first = first[:200].rsplit(" ", 1)[0] + " ..."
        if local.exists():  # a local folder: downloading is not the fix
            raise ModelLoadError(f"{key}: cannot load the folder '{path}' ({first}); check that it holds a complete "
                                 "diffusers model (save_pretrained output or a hub snapshot)") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or kwargs.get("local_files_only")
        how = ("it is not in the local Hugging Face cache and the hub is offline; download it with "
               f"`hf download {path}` on a machine with internet, or set {key} to a local folder") if offline else \
              f"download it with `hf download {path}` or set {key} to a local folder"
        raise ModelLoadError(f"{key}: cannot load '{path}' ({first}); {how}") from err