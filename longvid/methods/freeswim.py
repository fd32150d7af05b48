"""FreeSwim (arXiv 2511.14712): 1080p and 4K from a native-resolution Wan, training-free.

In a refine stage at the target size (the engine's stages: native generation -> pixel upsample -> re-noise),
every self-attention sees an *inward sliding window* of the model's native extent (31×53 tokens for a 480×832
base, shifted inside at the borders so every query sees the same number of keys), while a full-attention branch
runs beside it and lends the window branch its cross-attention output in every block (the *override*): the
window keeps local detail at training scale, the full branch keeps the global semantics. In ``cache`` mode the
full branch runs only every ``cache_steps`` cond passes and the blocks reuse its cached cross-attention between
them. The tensor side lives in ``core/freeswim.py``, ``core/swin_attention.py`` and ``core/swin_geometry.py``;
docs/methods/freeswim.md maps each official quirk to its option. Torch-free module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Literal, Optional

from longvid.methods.base import Method, MethodConfig


@dataclass
class FreeSwimConfig(MethodConfig):
    """Settings of ``methods.freeswim``."""

    mode: Literal["cache", "nocache"] = "cache"
    """``nocache``: both branches at every call (cond and uncond); ``cache``: the full branch only on guide steps
    of the cond pass, its cross-attention reused in between, the uncond pass window-only (official ``--mode``)."""
    cache_steps: int = 2
    """Cache mode: a guide step every this many steps of the stage (official default 2; its comment suggests 5)."""
    cache_device: Literal["device", "cpu"] = "device"
    """Where the per-block cache lives: on the model's device, or offloaded to CPU memory (≈15.8 GB in bf16 for Wan
    1.3B at 1088×1920, 81 frames)."""
    base: Optional[List[int]] = None
    """``[height, width]`` in pixels of the model's native size, which sizes the window (480×832 -> 31×53 tokens).
    None = the recipe's first stage size."""
    scale: Literal["official", "tokens", "default"] = "official"
    """Self-attention scale of both branches: ``official`` = sqrt(log_1560 3120 / d) (a fixed 1.046× the
    default), ``tokens`` = the same entropy rule with the real token ratio of target to base, ``default`` = 1/√d."""
    inward: bool = True
    """Shift border windows inside (FreeSwim); false truncates them at the border (the paper's ablation)."""
    override: bool = True
    """The window branch takes the full branch's cross-attention output (false: its own; an ablation)."""
    backend: Literal["auto", "tiled", "flex"] = "auto"
    """Window kernel: ``tiled`` (exact tiled SDPA, any device), ``flex`` (compiled flex_attention on a block mask),
    ``auto`` = flex on CUDA, tiled elsewhere."""
    token_order: Literal["tile", "raster"] = "tile"
    """Flex only: the token order of the block mask; ``tile`` (8 frames × 4 × 4 per block) keeps 0.25 of the blocks
    at 1080p where ``raster`` (the official order) keeps 0.48."""

    def __post_init__(self):
        if self.cache_steps < 1:
            raise ValueError(f"methods.freeswim.cache_steps must be at least 1, got {self.cache_steps}")
        if self.base is not None and (len(self.base) != 2 or any(not isinstance(x, int) or x <= 0 for x in self.base)):
            raise ValueError(f"methods.freeswim.base must be [height, width] in pixels, got {list(self.base)}")


class FreeSwim(Method):
    """FreeSwim: inward sliding-window attention with a full branch's cross-attention (1080p/4K refine)"""

    name = "freeswim"
    Config = FreeSwimConfig
    seams = frozenset({"attention", "denoiser"})
    families = frozenset({"wan"})
    long_video = False

    @classmethod
    def patched_sites(cls, config: FreeSwimConfig, spec: Any) -> frozenset[str]:
        return frozenset({"full", "cross"})

    @classmethod
    def check(cls, config: FreeSwimConfig, recipe: Any, spec: Any) -> list[tuple[str, str]]:
        m = spec.spatial_multiple
        if config.base is not None and any(x % m for x in config.base):
            return [("methods.freeswim.base", f"{spec.name} sizes are multiples of {m}, got {list(config.base)}")]
        return []

    @classmethod
    def identity_settings(cls, spec: Any) -> dict[str, Any]:
        return {"scale": "default"}  # the window (from the first stage = the video size) covers the canvas

    @classmethod
    def active_settings(cls, spec: Any) -> dict[str, Any]:
        return {"base": [16, 32]}  # a 1×3-token window on the contract tests' 2×4-token frames

    def apply(self, adapter: Any, ctx: Any) -> None:
        from longvid.core.freeswim import SwimCrossProcessor, SwimSelfOp, SwimState, branches_forward
        from longvid.core.hooks import replace_forward
        from longvid.core.swin_attention import covers_canvas
        from longvid.core.swin_geometry import window_half

        cfg = self.config
        base = tuple(cfg.base) if cfg.base is not None else (ctx.first_size or (ctx.height, ctx.width))
        grid = adapter.token_grid(ctx.num_frames, ctx.height, ctx.width)
        base_tokens = adapter.token_grid(ctx.num_frames, *base)[1:]
        if covers_canvas(grid, window_half(base_tokens), cfg.inward) and cfg.scale == "default":
            return  # both branches would be plain attention: nothing changes
        if cfg.mode == "cache":
            self._check_cache_fits(adapter, grid)
        self.state = state = SwimState(ctx, cfg.mode, cfg.cache_steps, cfg.cache_device)
        op = SwimSelfOp(state, base, (ctx.height, ctx.width), cfg.scale, cfg.inward, cfg.backend, cfg.token_order)
        for name, model in adapter.named_denoisers.items():
            self.on_remove(adapter.claim_module(model, f"denoiser {name}", self.name))
            self.on_remove(replace_forward(model, "longvid.freeswim.branches", branches_forward(state, name)))
        for site in adapter.attention_sites("full"):
            self.on_remove(adapter.install_op(site, op, self.name))
        for site in adapter.attention_sites("cross"):
            processor = SwimCrossProcessor(site, site.module.processor, state, cfg.override)
            self.on_remove(adapter.install_processor(site, processor, self.name))

    def _check_cache_fits(self, adapter: Any, grid: tuple[int, int, int]) -> None:
        """Refuse cache mode before the stage runs when the per-block cache cannot fit where it is to live (Wan 14B
        at 4K would need ~279 GB: 40 blocks × 680,400 tokens × 5120 × 2 bytes)."""
        from longvid.core.freeswim import cache_bytes, free_bytes
        from longvid.errors import MethodError

        need = cache_bytes(adapter, grid)
        device = adapter.device if self.config.cache_device == "device" else "cpu"
        free = free_bytes(device)
        if free is not None and need > 0.8 * free:
            raise MethodError(f"methods.freeswim.cache_device: the cache needs {need / 2**30:.1f} GiB, more than "
                              f"{device} has free ({free / 2**30:.1f} GiB); set methods.freeswim.mode=nocache"
                              + (" or cache_device=cpu" if self.config.cache_device == "device" else ""))

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Cache mode resumes exactly: the cache of the last guide step is saved with the checkpoint."""
        state = getattr(self, "state", None)
        if state is None or not state.cache:
            return {}, {}
        return {f"cache.{k}": v for k, v in state.cache.items()}, {"cached_for": sorted(state.cached_for)}

    def load_state_dict(self, tensors: dict[str, Any], data: dict[str, Any]) -> None:
        state = getattr(self, "state", None)
        if state is None:
            return
        for key, value in tensors.items():
            if key.startswith("cache."):
                state.keep(key.removeprefix("cache."), value)
        state.cached_for = set(data.get("cached_for", []))
