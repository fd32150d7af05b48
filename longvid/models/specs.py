"""Torch-free facts about each model family: defaults and the rules a recipe must satisfy before loading.

These are read by ``longvid show`` / ``validate`` (which never import torch) and by the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional


@dataclass(frozen=True)
class FamilySpec:
    """What a recipe needs to know about a model family without loading it.

    Attributes:
        name: registry name.
        description: one line for ``longvid models``.
        temporal_stride: VAE temporal compression; frames must be ``stride*k + 1`` when > 1 (causal VAE).
        spatial_multiple: height and width must be multiples of this (VAE stride x patch size).
        native_frames: frames the model was trained on (the natural context window).
        max_frames: the longest sequence the model can attend over at all without a long-video method
            (AnimateDiff's motion-module positional table), or None when unbounded.
        defaults: recipe values the family sets (layer 2 of the recipe layering).
        cuda_dtype: the denoiser dtype on a GPU when the recipe leaves ``model.dtype`` unset (CPU: float32).
        vae_spatial, latent_channels, patch_spatial: geometry for ``--dry-run`` estimates (the standard
            checkpoints; Wan 2.2 TI2V-5B compresses 16x spatially with 48 channels).
        attention_kinds: the attention-site kinds the family's adapter exposes (``temporal``, ``spatial``,
            ``full``, ``cross``), so methods can say what they patch before anything loads.
        scheduler: the diffusers scheduler class the family's checkpoints ship (``sampler.scheduler_config``
            keys are checked against it when ``sampler.scheduler`` is unset).
        rope_theta: the base of the family's rotary positions, or None without RoPE.
        riflex_k: RIFLEx's intrinsic temporal frequency (1-based) for the family, or None without a preset.
    """

    name: str
    description: str
    temporal_stride: int
    spatial_multiple: int
    native_frames: int
    max_frames: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    cuda_dtype: str = "bfloat16"
    vae_spatial: int = 8
    latent_channels: int = 16
    patch_spatial: int = 1
    attention_kinds: tuple[str, ...] = ()
    scheduler: str = ""
    rope_theta: float | None = None
    riflex_k: int | None = None
    loop: str = "steps"
    """``steps``: a denoising loop over one schedule; ``units``: an autoregressive loop (Pyramid Flow) whose progress,
    checkpoints and resume count latent units instead of steps."""
    options: type | None = None
    """The dataclass of ``model.options`` for this family (None: the family takes no options)."""
    variants: tuple[str, ...] = ()
    """``model.variant`` values (the first is the default); empty: the family has none."""
    image_to_video: bool = False
    """The family can start from an image (``image`` / ``--image``)."""
    check: Callable[[Any], list[tuple[str, str]]] | None = None
    """Family rules beyond the generic ones: ``check(recipe) -> [(dotted key, message)]`` (torch-free)."""

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` video frames (Wan: (F-1)/4 + 1)."""
        if self.temporal_stride == 1:
            return num_frames
        return (num_frames - 1) // self.temporal_stride + 1

    def frames_valid(self, num_frames: int) -> bool:
        return num_frames >= 1 and (self.temporal_stride == 1 or (num_frames - 1) % self.temporal_stride == 0)

    def nearest_frames(self, num_frames: int) -> tuple[int, int]:
        """The valid frame counts just below and just above ``num_frames``."""
        s = self.temporal_stride
        below = max(1, (num_frames - 1) // s * s + 1)
        return below, below + s


WAN = FamilySpec(
    name="wan",
    description="Wan 2.1 / 2.2 text-to-video DiT (3D RoPE, causal 4x8 VAE); 2.2 A14B two-expert and TI2V-5B",
    temporal_stride=4,
    spatial_multiple=16,
    native_frames=81,
    patch_spatial=2,
    attention_kinds=("full", "cross"),
    scheduler="UniPCMultistepScheduler",
    rope_theta=10000.0,
    # Wan's temporal band (44 dims) has periods 6, 10, 15, 22, 34, 51, 77, 118 latent frames; repetition shows at
    # ~51 latent frames (201 video frames), so k = 6 (N_k = 51), the community preset (no official Wan preset).
    riflex_k=6,
    defaults={
        "video": {"num_frames": 81, "height": 480, "width": 832, "fps": 16},
        "sampler": {"steps": 50, "guidance_scale": 5.0, "max_sequence_length": 512},
    },
)

ANIMATEDIFF = FamilySpec(
    name="animatediff",
    description="AnimateDiff: Stable Diffusion 1.5 UNet + MotionAdapter temporal attention (16 frames)",
    temporal_stride=1,
    spatial_multiple=8,
    native_frames=16,
    max_frames=32,
    cuda_dtype="float16",
    latent_channels=4,
    attention_kinds=("temporal", "spatial", "cross"),
    scheduler="DDIMScheduler",
    defaults={
        "video": {"num_frames": 16, "height": 512, "width": 512, "fps": 8},
        # AnimateDiff's documented sampler: DDIM with linear betas, linspace spacing, no sample clipping.
        "sampler": {"steps": 25, "guidance_scale": 7.5, "max_sequence_length": 77, "scheduler": "DDIMScheduler",
                    "scheduler_config": {"beta_schedule": "linear", "clip_sample": False,
                                         "timestep_spacing": "linspace", "steps_offset": 1}},
    },
)


@dataclass
class PyramidFlowOptions:
    """``model.options`` of Pyramid Flow (notes §5.3): the first latent is generated as an image, the later ones
    as video units with the temporal pyramid history."""

    image_steps: List[int] = field(default_factory=lambda: [20, 20, 20])
    """Steps of each pyramid stage for the first (image) unit."""
    video_steps: Optional[List[int]] = None
    """Steps of each pyramid stage for every later unit. None = ``sampler.steps`` at every stage."""
    video_guidance_scale: float = 5.0
    """Guidance of the video units (``sampler.guidance_scale`` guides the image unit; 0 there turns CFG off for all,
    as the official pipeline)."""
    prompt_suffix: bool = True
    """Append the official ", hyper quality, Ultra HD, 8K" to the prompt."""
    vae_tile: int = 256
    """Spatial VAE tile in pixels (0 = no tiling): a frame larger than the tile is decoded in tiles overlapping by
    1/4 and blended (the decode still streams latent by latent), and the i2v image encoded likewise. Tiling changes
    the pixels, so the default is what the official pipeline does by default: its README enables the VAE tiling and
    ``save_memory=True`` (the default of ``generate``/``generate_i2v``) decodes with 256-pixel tiles, and the i2v
    encode always uses 256 (``save_memory=False`` decodes with 512 but still encodes with 256; here one tile serves
    both). 0 decodes and encodes whole frames."""
    transformer_file: Optional[str] = None
    """One ``.safetensors`` file with the official DiT keys (ComfyUI's bf16/fp8 files) that replaces the variant's
    ``diffusion_transformer_*`` weights; ``model.path`` still supplies the text encoders (and the config.json)."""
    vae_file: Optional[str] = None
    """One ``.safetensors`` file with the official causal-VAE keys that replaces ``causal_video_vae``'s weights."""
    history_window: Optional[int] = None
    """None (official): every unit sees all earlier units, and a video may not be longer than the variant was
    trained for. N: every unit sees only the last N units, renumbered from τ = 0, so any length is allowed and the
    model never meets a temporal position it was not trained on (longvid's extension; at most the trained units
    − 1; older units then no longer steer the video, so it can drift)."""

    def __post_init__(self):
        for key in ("image_steps", "video_steps"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or any(not isinstance(n, int) or n < 1 for n in value)):
                raise ValueError(f"model.options.{key} must be three step counts >= 1 (one per pyramid stage), got "
                                 f"{list(value)}")
        if self.video_guidance_scale < 0:
            raise ValueError(f"model.options.video_guidance_scale must be >= 0, got {self.video_guidance_scale}")
        tile = self.vae_tile
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0 or tile % 64:
            raise ValueError(f"model.options.vae_tile must be 0 (no tiling) or a multiple of 64 pixels, got {tile!r}; "
                             "use 256 (the official default) or 512")
        window = self.history_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"model.options.history_window must be a number of units >= 1 (or null for the whole "
                             f"history), got {window!r}")


#: the longest video each released resolution was trained for (latent units): 384p temp 16, 768p temp 31
PYRAMID_TRAINED_UNITS = {"diffusion_transformer_384p": 16, "diffusion_transformer_768p": 31,
                         "diffusion_transformer_image": 1}


def _check_pyramid_flow(recipe) -> list[tuple[str, str]]:
    from longvid.models.pyramid_flow.single_file import check_options

    problems = check_options(recipe.model)  # the single files: there, safetensors, a readable header, the right model
    if recipe.stages:
        problems.append(("stages", "Pyramid Flow generates in one pass (its own spatial pyramid); remove stages"))
    if recipe.model.dtype == "float16":
        problems.append(("model.dtype", "Pyramid Flow gives NaNs (black video) in float16; use bfloat16 or float32"))
    if recipe.sampler.scheduler is not None:
        problems.append(("sampler.scheduler", "Pyramid Flow has its own pyramid flow-matching schedule; remove it"))
    if recipe.runtime.layerwise_casting != "none":
        problems.append(("runtime.layerwise_casting", "not available for Pyramid Flow yet; use none"))
    if recipe.runtime.offload == "group":  # its loop calls the DiT's layers directly: the model-level hook never runs
        problems.append(("runtime.offload", "group offloading is not available for Pyramid Flow; use model (per "
                                            "phase) or sequential (per layer)"))
    variant = recipe.model.variant or PYRAMID_FLOW.variants[0]
    units = PYRAMID_FLOW.latent_frames(recipe.video.num_frames or 1)
    limit = PYRAMID_TRAINED_UNITS.get(variant)
    window = recipe.model.options.get("history_window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        window = None  # (a bad value is reported by the options check)
    if limit is not None and window is not None and window > limit - 1:
        problems.append(("model.options.history_window", f"{variant} was trained with up to {limit - 1} history "
                                                         f"units; set at most {limit - 1}"))
    elif limit is not None and units > limit and window is None:
        problems.append(("video.num_frames", f"{variant} was trained for up to {limit} latents "
                                             f"({1 + 8 * (limit - 1)} frames); {recipe.video.num_frames} frames need "
                                             f"{units}; shorten it, or set model.options.history_window (at most "
                                             f"{limit - 1}) to cap the history (an extension)"))
    return problems


PYRAMID_FLOW = FamilySpec(
    name="pyramid_flow",
    description="Pyramid Flow: autoregressive pyramidal flow matching (miniFLUX or SD3 DiT, causal 8x8x8 VAE)",
    temporal_stride=8,
    spatial_multiple=64,
    native_frames=121,
    latent_channels=16,
    patch_spatial=2,
    cuda_dtype="bfloat16",
    loop="units",
    options=PyramidFlowOptions,
    variants=("diffusion_transformer_384p", "diffusion_transformer_768p", "diffusion_transformer_image"),
    image_to_video=True,
    check=_check_pyramid_flow,
    defaults={
        "video": {"num_frames": 121, "height": 384, "width": 640, "fps": 24},
        "sampler": {"steps": 10, "guidance_scale": 7.0, "max_sequence_length": 128},
        "negative_prompt": "cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, "
                           "extra limbs, extra digits, misplaced objects, mutated anatomy, monochrome, horror",
    },
)


#: ``model.path: tiny:<variant>`` -> family of the built-in random-weight model (see models/tiny.py)
TINY_VARIANTS = {"wan": "wan", "wan2.2-a14b": "wan", "wan2.2-ti2v": "wan", "animatediff": "animatediff",
                 "pyramid-flow": "pyramid_flow"}
