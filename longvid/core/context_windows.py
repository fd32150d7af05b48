"""Context windows at the denoiser seam: run the whole model on overlapping windows of latent frames.

For DiTs with full 3D attention (Wan) there is no separate temporal layer to window, so FreeNoise's window
fusion moves up one level: the denoiser runs on each window of ``window`` latent frames (the model's native
length) and the per-frame predictions are fused with the window weights. Positions are window-local (each
call starts at frame 0), so RoPE never leaves its trained range, and the cost grows linearly with length.
This is the ComfyUI / WanVideoWrapper "context options" idea, with FreeNoise's weightings and tail handling.
"""

from __future__ import annotations

from typing import Callable

import torch

from longvid.core.prompts import assign_windows
from longvid.core.windows import WindowAccumulator, fusion_plan

Denoise = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def windowed_denoiser(denoise: Denoise, *, window: int, stride: int, weighting: str = "pyramid",
                      frame_dim: int = 2, frame_of_latent: Callable[[int], int] = lambda f: f) -> Denoise:
    """Wrap ``denoise(x, t, cond)`` so it runs per window of ``window`` latent frames and fuses the results.

    ``x`` with at most ``window`` frames is passed through unchanged (exactly the vanilla model). For
    multi-prompt conditioning (``cond.keyframes`` keyed by *video* frame), each window uses the keyframe
    prompt covering most of its frames; ``frame_of_latent`` maps a latent frame index to its first video frame.
    """

    def fused(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        frames = x.shape[frame_dim]  # x: (B, C, F', H, W)
        if frames <= window:
            return denoise(x, t, _window_cond(cond, [0], [(0, frames)], frame_of_latent)[0])
        plan = fusion_plan(frames, window, stride, weighting)
        conds = _window_cond(cond, range(len(plan.views)), plan.views, frame_of_latent)
        acc = WindowAccumulator(plan, x, frame_dim)  # accumulates in the latents' dtype (float32)
        for i, (start, end) in enumerate(plan.views):
            acc.add(i, denoise(x.narrow(frame_dim, start, end - start), t, conds[i]))  # (B, C, L, H, W)
        return acc.result()

    return fused


def _window_cond(cond, indices, views, frame_of_latent):
    """One conditioning per window: the keyframe prompt covering most of it, or ``cond`` itself."""
    keyframes = getattr(cond, "keyframes", None)
    if not keyframes:
        return [cond for _ in indices]
    video_views = [(frame_of_latent(s), frame_of_latent(e - 1) + 1) for s, e in views]
    return [keyframes[k] for k in assign_windows(keyframes, video_views)]
