"""FreeLong (Lu et al., NeurIPS 2024, arXiv 2407.19918): SpectralBlend temporal attention.

Every patched self-attention computes a **global** branch (full attention over all frames: consistent
low-frequency structure) and a **local** branch (attention within a window of the model's native length:
sharp high-frequency detail) and mixes them in 3D frequency space: the low spatio-temporal frequencies from
the global branch, the rest from the local one (Gaussian low-pass, ``d_s``/``d_t`` = 0.25 of Nyquist).

- UNets (AnimateDiff): every motion-module temporal self-attention, as the official LaVie/VideoCrafter2
  code patches every temporal layer. The official code uses the local branch alone at the full-resolution
  level (its ``d != 2560`` check); ``full_resolution: local`` reproduces that (default), ``blend`` blends there too.
- DiTs (Wan): longvid's extension. Global = the full 3D self-attention; local = self-attention restricted
  to a window of latent frames (block-sparse, never a dense mask); blended over the (F, H, W) token grid.
  ``layers`` and ``steps`` choose where it applies.

The official FreeLong also reschedules the initial noise with FreeNoise; the ``freelong-*`` recipes add
``methods.freenoise`` with ``fusion: none`` for that. Torch-free module; the op is
``longvid.core.spectral.SpectralBlendAttention``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional

from longvid.methods.base import Method, MethodConfig


@dataclass
class FreeLongConfig(MethodConfig):
    """Settings of ``methods.freelong``."""

    window: Optional[int] = None
    """Local-branch window in video frames. None = the model's native length (16 AnimateDiff, 81 Wan)."""
    window_mode: Literal["adjusted", "strict"] = "adjusted"
    """adjusted = LaVie's window (always ``window`` frames wide at the ends; F <= window is exactly vanilla);
    strict = VideoCrafter2's band |i-j| <= window/2 (narrower at the ends)."""
    d_s: float = 0.25
    """Spatial stop frequency of the Gaussian low-pass (fraction of Nyquist); 0 = local branch only."""
    d_t: float = 0.25
    """Temporal stop frequency of the Gaussian low-pass; 0 = local branch only."""
    grid: Literal["official", "centered"] = "official"
    """official = the official frequency grid (DC off-centre for odd sizes, reproduced exactly);
    centered = DC exactly at the centre for odd sizes (a documented fix)."""
    full_resolution: Literal["local", "blend"] = "local"
    """UNets: the full-resolution level uses the local branch only (official) or blends like the others."""
    layers: Optional[List[int]] = None
    """Layer indices of the patched self-attention sites (0-based, in model order, per denoiser: on Wan 2.2
    A14B, ``[3]`` patches block 3 of both experts). None = all."""
    steps: List[float] = field(default_factory=lambda: [0.0, 1.0])
    """[start, end) fraction of the schedule where FreeLong applies (step i of N is inside when
    start <= i/N < end); vanilla attention elsewhere."""

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise ValueError(f"methods.freelong.window must be at least 1, got {self.window}")
        for key in ("d_s", "d_t"):
            if getattr(self, key) < 0:
                raise ValueError(f"methods.freelong.{key} must be >= 0, got {getattr(self, key)}")
        if len(self.steps) != 2 or not 0 <= self.steps[0] < self.steps[1] <= 1:
            raise ValueError(f"methods.freelong.steps must be [start, end] with 0 <= start < end <= 1, got {self.steps}")


class FreeLong(Method):
    """FreeLong: SpectralBlend global+local temporal attention (NeurIPS 2024)"""

    name = "freelong"
    Config = FreeLongConfig
    seams = frozenset({"attention"})
    families = frozenset({"animatediff", "wan"})

    @classmethod
    def check(cls, config: FreeLongConfig, recipe: Any, spec: Any) -> list[tuple[str, str]]:
        problems = []
        if spec.temporal_stride > 1 and config.window is not None and not spec.frames_valid(config.window):
            below, above = spec.nearest_frames(config.window)
            problems.append(("methods.freelong.window", f"{spec.name} windows need {spec.temporal_stride}k+1 frames, "
                                                        f"got {config.window} (nearest: {below} or {above})"))
        freenoise = recipe.methods.get("freenoise")
        if freenoise is not None and _share_a_stage(recipe, "freelong", "freenoise"):
            from longvid.methods.freenoise import FreeNoise

            if FreeNoise.fusion_for(freenoise, spec) == "denoiser":  # block/layer: a site conflict, reported generically
                problems.append(("methods.freelong", "FreeNoise context windows cut the video before FreeLong's "
                                                     "global branch sees it; combine them with "
                                                     "methods.freenoise.fusion=none (noise rescheduling only)"))
        return problems

    @classmethod
    def patched_sites(cls, config: FreeLongConfig, spec: Any) -> frozenset[str]:
        return frozenset({"temporal" if "temporal" in spec.attention_kinds else "full"})

    def apply(self, adapter: Any, ctx: Any) -> None:
        from longvid.core.processors import StepWindow
        from longvid.core.spectral import SpectralBlendAttention

        cfg = self.config
        spec = adapter.spec
        window = spec.latent_frames(cfg.window or spec.native_frames)
        sites = adapter.attention_sites("temporal") or adapter.attention_sites("full")
        layers = 1 + max(s.layer for s in sites)
        chosen = set(range(layers)) if cfg.layers is None else set(cfg.layers)
        if chosen - set(range(layers)):
            from longvid.errors import MethodError

            raise MethodError(f"methods.freelong.layers: this model has {layers} self-attention layers per "
                              f"denoiser (0..{layers - 1}), got {sorted(chosen)}")
        for site in sites:
            if site.layer not in chosen:
                continue
            local_only = site.kind == "temporal" and site.level == 0 and cfg.full_resolution == "local"
            op = SpectralBlendAttention(window=window, window_mode=cfg.window_mode, d_s=cfg.d_s, d_t=cfg.d_t,
                                        grid=cfg.grid, local_only=local_only)
            self.on_remove(adapter.install_op(site, StepWindow(op, ctx, *cfg.steps), self.name))


def _share_a_stage(recipe: Any, a: str, b: str) -> bool:
    from longvid.recipe.stages import MAIN_STAGE, methods_in

    return any(a in methods_in(recipe, s) and b in methods_in(recipe, s) for s in (list(recipe.stages) or [MAIN_STAGE]))
