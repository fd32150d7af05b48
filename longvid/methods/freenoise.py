"""FreeNoise (Qiu et al., ICLR 2024, arXiv 2310.15169): noise rescheduling + window fusion + multi-prompt.

- **Noise** (noise seam): frames beyond the first window reuse the first window's noise, shuffled within
  stride blocks — seeded from the recipe's generator, for any frame count (``core/noise.py``).
- **Window fusion**, chosen by ``fusion``:
  ``block`` (AnimateDiff default): each motion-module transformer block runs per window and the windows'
  states are averaged before the feed-forward, as diffusers' ``enable_free_noise`` and the official
  AnimateDiff port do; ``layer``: each temporal self-attention is fused on its own, as the official
  VideoCrafter code does; ``denoiser`` (DiT default, e.g. Wan): the whole model runs on windows of latent
  frames and the predictions are fused (context windows, ``core/context_windows.py``); ``none``: noise only
  (what FreeLong's official code uses).
- **Multi-prompt**: ``prompt: {frame: text}``; per-frame interpolated embeddings on UNets, one keyframe
  prompt per window on DiTs.

Differences from the official code and from diffusers (all on purpose; docs/methods/freenoise.md):
tail windows always cover the last frames, with diffusers' tail-weight bug fixed (``w[-k:]``); frames ≤ window
are exactly vanilla; ``delayed_reverse_sawtooth`` has exactly ``window`` weights for odd windows; any frame
count works. This module is torch-free; the tensor code lives in ``longvid.core``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional

from longvid.methods.base import Method, MethodConfig


@dataclass
class FreeNoiseConfig(MethodConfig):
    """Settings of ``methods.freenoise``. Frame counts are video frames (converted to latent frames on Wan)."""

    window: Optional[int] = None
    """Window length in video frames. None = the model's native length (16 AnimateDiff, 81 Wan)."""
    stride: Optional[int] = None
    """Frames between window starts. None = 4 (UNet, official) or half the window, rounded to the VAE's
    temporal stride (DiT)."""
    weighting: Literal["pyramid", "flat", "delayed_reverse_sawtooth"] = "pyramid"
    """How overlapping windows are averaged: pyramid (official), flat, or diffusers' delayed reverse sawtooth."""
    fusion: Literal["auto", "block", "layer", "denoiser", "none"] = "auto"
    """Where windows are fused: auto = block on UNets, denoiser on DiTs; none = noise rescheduling only."""
    noise: Literal["shuffle", "gaussian"] = "shuffle"
    """shuffle = FreeNoise noise rescheduling; gaussian = plain independent noise per frame."""
    injection: bool = False
    """Multi-prompt motion injection (official, UNets): outside ``injection_steps`` the encoder and middle
    spatial cross-attention of the conditional pass see the *last* prompt, the decoder the per-frame prompts."""
    injection_steps: List[float] = field(default_factory=lambda: [0.1, 0.32])
    """[a, b): steps with a <= step/steps < b use the per-frame prompts everywhere (longvid's one step-window
    rule); the default is the official schedule, steps 5..15 of 50."""

    def __post_init__(self):
        for key in ("window", "stride"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"methods.freenoise.{key} must be at least 1, got {value}")
        a_b = list(self.injection_steps)
        if len(a_b) != 2 or not 0 <= a_b[0] <= a_b[1] <= 1:
            raise ValueError(f"methods.freenoise.injection_steps must be [a, b] with 0 <= a <= b <= 1, got {a_b}")


class FreeNoise(Method):
    """FreeNoise: noise rescheduling + window fusion + multi-prompt (ICLR 2024)"""

    name = "freenoise"
    Config = FreeNoiseConfig
    seams = frozenset({"noise", "attention", "denoiser"})
    families = frozenset({"animatediff", "wan"})
    multi_prompt = True

    @classmethod
    def check(cls, config: FreeNoiseConfig, recipe: Any, spec: Any) -> list[tuple[str, str]]:
        problems = []
        window, stride = cls.geometry(config, spec)
        key = "methods.freenoise"
        if spec.temporal_stride > 1:
            s = spec.temporal_stride
            if config.window is not None and not spec.frames_valid(config.window):
                below, above = spec.nearest_frames(config.window)
                problems.append((f"{key}.window", f"{spec.name} windows need {s}k+1 frames, got {config.window} "
                                                  f"(nearest: {below} or {above})"))
            if config.stride is not None and config.stride % s:
                problems.append((f"{key}.stride", f"{spec.name} strides are whole latent frames: a multiple of "
                                                  f"{s}, got {config.stride}"))
            if config.fusion in ("block", "layer"):
                problems.append((f"{key}.fusion", f"{spec.name} has no separate temporal attention layers; use "
                                                  f"denoiser (context windows), auto or none"))
        if config.injection and (not isinstance(recipe.prompt, dict) or spec.temporal_stride > 1):
            problems.append((f"{key}.injection", "motion injection needs a {frame: prompt} mapping on a UNet "
                                                 "(AnimateDiff)"))
        if isinstance(recipe.prompt, dict) and spec.temporal_stride > 1 and config.fusion == "none":
            problems.append((f"{key}.fusion", "multi-prompt on a DiT assigns one prompt per context window; "
                                              "use fusion=auto or denoiser"))
        if config.stride is not None and stride > window:  # in latent frames, the default window included
            shown = config.window or spec.native_frames
            problems.append((f"{key}.stride", f"must not exceed the window ({shown} frames), got {config.stride}"))
        return problems

    @classmethod
    def patched_sites(cls, config: FreeNoiseConfig, spec: Any) -> frozenset[str]:
        kinds = set()
        if cls.fusion_for(config, spec) in ("block", "layer"):
            kinds.add("temporal")
        if config.injection:
            kinds.add("cross")
        return frozenset(kinds)

    @staticmethod
    def fusion_for(config: FreeNoiseConfig, spec: Any) -> str:
        """The fusion a configuration runs on a family: ``auto`` = block on UNets (temporal layers), else denoiser."""
        if config.fusion != "auto":
            return config.fusion
        return "block" if "temporal" in spec.attention_kinds else "denoiser"

    @staticmethod
    def geometry(config: FreeNoiseConfig, spec: Any) -> tuple[int, int]:
        """(window, stride) in *latent* frames for a family."""
        window = config.window or spec.native_frames
        if spec.temporal_stride == 1:
            return window, config.stride or 4
        s = spec.temporal_stride
        window_lat = spec.latent_frames(window)
        stride_lat = (config.stride // s) if config.stride else max(1, window_lat // 2)
        return window_lat, stride_lat

    @classmethod
    def window_bounds(cls, config: FreeNoiseConfig, num_frames: int, spec: Any) -> list[int]:
        """Every context window's first and past-the-end latent frame, inside the video (fused windows only: noise
        rescheduling alone has no window in the model)."""
        if cls.fusion_for(config, spec) == "none":
            return []
        from longvid.core.windows import context_views

        frames = spec.latent_frames(num_frames)
        window, stride = cls.geometry(config, spec)
        return sorted({f for view in context_views(frames, window, stride) for f in view if 0 < f < frames})

    def _fusion(self, adapter: Any) -> str:
        return self.fusion_for(self.config, adapter.spec)

    # ------------------------------------------------------------------------------------------ seams

    def noise_builder(self, adapter: Any):
        if self.config.noise == "gaussian":
            return None
        from functools import partial

        from longvid.core.noise import freenoise_noise

        window, stride = self.geometry(self.config, adapter.spec)
        return partial(freenoise_noise, window=window, stride=stride)

    def apply(self, adapter: Any, ctx: Any) -> None:
        window, stride = self.geometry(self.config, adapter.spec)
        fusion = self._fusion(adapter)
        if fusion == "block":
            from longvid.core.block_fusion import apply_block_fusion

            sites = adapter.attention_sites("temporal")
            for site in sites:  # the hook runs each block's attention half per view: its sites are ours
                self.on_remove(adapter.claim(site, self.name))
            for block in {id(s.block): s.block for s in sites}.values():
                handle = apply_block_fusion(block, window=window, stride=stride, weighting=self.config.weighting)
                self.on_remove(handle.remove)
        elif fusion == "layer":
            self._apply_layer_fusion(adapter, window, stride)
        if self.config.injection:
            self._apply_injection(adapter, ctx)

    def _apply_injection(self, adapter: Any, ctx: Any) -> None:
        """Official two-prompt motion injection, with the step schedule scaled to the number of steps.

        The conditional half of the batch is the last ``F`` rows of the cross-attention context (CFG batches
        are [uncond, cond], frame-major inside each); at injection steps the encoder and middle blocks see the
        last keyframe prompt there, while the decoder keeps the per-frame prompts.
        """
        from longvid.core.hooks import add_hook, pre_forward_hook
        from longvid.core.processors import in_step_window

        a, b = self.config.injection_steps
        state = self._injection = {"last": None}

        def inject(module, args, kwargs):
            context = kwargs.get("encoder_hidden_states")
            if (state["last"] is None or context is None or ctx.cfg_branch == "uncond"
                    or in_step_window(ctx, a, b)):
                return None
            frames = ctx.num_frames  # the cond rows are the last F: [uncond, cond] batched, or cond alone
            context = context.clone()
            context[-frames:] = state["last"].to(context.dtype)  # (F, seq, D) <- last prompt, cond pass only
            return args, {**kwargs, "encoder_hidden_states": context}

        for site in adapter.attention_sites("cross"):
            if site.part in ("encoder", "middle"):
                self.on_remove(adapter.claim(site, self.name))
                self.on_remove(add_hook(site.module, "longvid.freenoise.injection", pre_forward_hook(inject)))

    def _apply_layer_fusion(self, adapter: Any, window: int, stride: int) -> None:
        import torch

        from longvid.core.hooks import replace_forward
        from longvid.core.window_attention import WindowFusedAttnProcessor

        tables = {}
        for site in adapter.attention_sites("temporal"):
            positions = None
            if site.pos_embed is not None:
                # Window-local positions: the processor adds the table's first `window` rows per window, and
                # the block's own (global) positional embedding is switched off while the method is applied.
                key = id(site.pos_embed)
                if key not in tables:
                    q = site.module.to_q
                    # the compute dtype, not fp8 storage's (runtime.layerwise_casting)
                    dtype = adapter.compute_dtypes.get(adapter.denoiser_names[0]) or q.weight.dtype
                    zeros = torch.zeros(1, window, q.in_features, device=q.weight.device, dtype=dtype)
                    table = site.pos_embed(zeros)  # (1, window, C): the positional term alone
                    tables[key] = table
                    self.on_remove(replace_forward(site.pos_embed, "longvid.freenoise.positions",
                                                   lambda module, forward, x: x))
                positions = _AddTable(tables[key])
            processor = WindowFusedAttnProcessor(window=window, stride=stride, weighting=self.config.weighting,
                                                 pos_embed=positions)
            self.on_remove(adapter.install_processor(site, processor, self.name))

    def wrap_denoiser(self, denoise, adapter: Any, ctx: Any):
        fusion = self._fusion(adapter)
        if fusion == "denoiser":
            from longvid.core.context_windows import windowed_denoiser

            window, stride = self.geometry(self.config, adapter.spec)
            s = adapter.spec.temporal_stride
            return windowed_denoiser(denoise, window=window, stride=stride, weighting=self.config.weighting,
                                     frame_of_latent=lambda f: 0 if f == 0 else (f - 1) * s + 1)
        if adapter.attention_sites("temporal"):
            return _per_frame_prompts(denoise, ctx.num_frames, getattr(self, "_injection", None))
        return denoise


class _AddTable:
    """``x + table[:, :S]``: a fixed positional table added to a window of S frames."""

    def __init__(self, table):
        self.table = table

    def __call__(self, x):
        return x + self.table[:, : x.shape[1]].to(x.dtype)


def _per_frame_prompts(denoise, num_frames: int, injection: dict | None = None):
    """UNets condition every frame separately: interpolate multi-prompt keyframes to one embedding per frame.

    With motion injection, also hands the last keyframe's embedding to the injection hooks.
    """

    cache = {}

    def wrapped(x, t, cond):
        if not cond.keyframes:
            return denoise(x, t, cond)
        if "cond" not in cache:
            from longvid.core.prompts import interpolate_keyframes
            from longvid.models.base import Conditioning

            keys = cond.keyframes
            positive = interpolate_keyframes({k: c.positive[0] for k, c in keys.items()}, num_frames)
            negative = None
            if cond.negative is not None:
                negative = interpolate_keyframes({k: c.negative[0] for k, c in keys.items()}, num_frames)
            cache["cond"] = Conditioning(positive, negative)  # (F, seq, D) each
            if injection is not None:
                injection["last"] = keys[max(keys)].positive[0]  # (seq, D)
        return denoise(x, t, cache["cond"])

    return wrapped
