"""Torch-free facts about each model family: defaults and the rules a recipe must satisfy before loading.

These are read by ``longvid show`` / ``validate`` (which never import torch) and by the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


#: ``model.path: tiny:<variant>`` -> family of the built-in random-weight model (see models/tiny.py)
TINY_VARIANTS = {"wan": "wan", "wan2.2-a14b": "wan", "wan2.2-ti2v": "wan", "animatediff": "animatediff"}
