"""Stage transitions of a coarse-to-fine plan: the hand-off to a larger size and the re-noise.

``pixel`` hand-off: the previous stage's latents are decoded chunk by chunk, each chunk is resized and
encoded at once (posterior mode), so neither the decoded nor the resized video is ever held whole: peak
memory is one chunk of frames at the new size plus the latents. ``latent`` hand-off resizes the latents.
Then the stage's start point is reached by ``scheduler.add_noise(init, noise, t_start)`` (diffusers'
video-to-video rule; ``scale_noise`` for schedulers that name it so).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F


def resize_frames(chunk: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Resize decoded frames ``(B, 3, f, H, W)`` in [-1, 1] to ``(B, 3, f, height, width)`` (float32)."""
    b, c, f, h, w = chunk.shape
    frames = chunk.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).float()  # (B*f, 3, H, W)
    align = None if mode == "nearest" else False
    frames = F.interpolate(frames, size=(height, width), mode=mode, align_corners=align)
    if mode == "bicubic":
        frames = frames.clamp(-1.0, 1.0)  # bicubic overshoots; the VAE saw pixels in [-1, 1]
    return frames.reshape(b, f, c, height, width).permute(0, 2, 1, 3, 4)  # (B, 3, f, h', w')


def resize_latents(x: torch.Tensor, shape: tuple[int, ...], mode: str) -> torch.Tensor:
    """Latents ``(B, C, F, H, W)`` to ``shape``: per frame when the frame count stays (any 2-D filter), else 3-D
    (``bilinear`` -> trilinear, ``nearest``)."""
    b, c, f, h, w = x.shape
    _, _, f2, h2, w2 = shape
    if f2 == f:
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B*F, C, H, W)
        align = None if mode == "nearest" else False
        frames = F.interpolate(frames, size=(h2, w2), mode=mode, align_corners=align)
        return frames.reshape(b, f, c, h2, w2).permute(0, 2, 1, 3, 4).contiguous()
    mode3 = {"bilinear": "trilinear", "nearest": "nearest"}[mode]
    align = None if mode3 == "nearest" else False
    return F.interpolate(x, size=(f2, h2, w2), mode=mode3, align_corners=align)


@torch.no_grad()
def handoff(adapter, x: torch.Tensor, plan, runtime, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The clean latents stage ``plan`` starts from, made from the previous stage's result ``x``."""
    shape = adapter.latent_shape(plan.num_frames, plan.height, plan.width)
    if plan.upsample == "latent":
        return resize_latents(x.float(), shape, plan.interpolation)

    def resized() -> Iterator[torch.Tensor]:
        done = 0
        for chunk in adapter.decode_stream(x, runtime):  # (B, 3, f, H, W)
            yield resize_frames(chunk, plan.height, plan.width, plan.interpolation)
            done += chunk.shape[2]
            if progress is not None:
                progress(done, plan.num_frames)

    return adapter.encode_stream(resized(), runtime)


def renoise(scheduler, init: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``init`` noised to timestep ``t`` (the first of the stage's remaining schedule), as the v2v pipelines do."""
    timestep = t.reshape(1).expand(init.shape[0])
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(init, noise, timestep)
    return scheduler.scale_noise(init, timestep, noise)
