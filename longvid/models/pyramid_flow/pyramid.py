"""The spatial pyramid of Pyramid Flow: a unit's noise at ¼ resolution, clean latents at three resolutions, and the
history of clean latents each stage of a unit sees (notes §5.2–5.3).

Stages run at ¼, ½ and full latent resolution (stage 0, 1, 2). A unit's noise is drawn at full resolution and
halved twice (bilinear ½ = 2×2 average, times 2 to keep unit variance). The history of unit ``u`` at stage ``s``
holds every earlier latent frame, clean, newest at the stage's own resolution and older ones at lower
resolutions: at stage 2 ``[0..u−3 @¼] + [u−2 @½] + [u−1 @full]``, at stage 1 ``[0..u−2 @¼] + [u−1 @½]``, at
stage 0 ``[0..u−1 @¼]`` — never above the current stage's resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def half(x: torch.Tensor) -> torch.Tensor:
    """Bilinear ½ (align_corners False: the 2×2 average) of ``x`` (B, C, T, h, w), frame by frame."""
    b, c, t, h, w = x.shape
    y = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), scale_factor=0.5, mode="bilinear",
                      align_corners=False)
    return y.reshape(b, t, c, h // 2, w // 2).permute(0, 2, 1, 3, 4)


def unit_noise(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Every unit's starting noise, drawn up front at full latent size ``shape`` (B, C, T, H, W) from ``generator``
    and brought to ¼ resolution (two halvings, ×2 each: unit variance): ``(B, C, T, H/4, W/4)``."""
    return quarter(torch.randn(shape, generator=generator, dtype=dtype, device=device))


def quarter(noise: torch.Tensor) -> torch.Tensor:
    """Full-size noise ``(B, C, T, H, W)`` at ¼ resolution with unit variance (two halvings, ×2 each)."""
    for _ in range(2):
        noise = half(noise) * 2
    return noise


def pyramid(latents: torch.Tensor, stages: int = 3) -> list[torch.Tensor]:
    """Clean latents at every stage's resolution, indexed by stage: ``[¼, ½, full]`` for three stages (plain
    averaging, no ×2: these are images, not noise)."""
    levels = [latents]
    for _ in range(stages - 1):
        levels.append(half(levels[-1]))
    return levels[::-1]


def history_plan(unit: int, stage: int) -> list[tuple[int, int]]:
    """``(latent frame, stage resolution)`` of the history of ``unit`` at ``stage``, oldest first: the newest frame at
    the stage's resolution, then one older frame per lower stage above 0, then every remaining frame at stage 0."""
    plan = []
    frame, level = unit - 1, stage
    while frame >= 0 and level > 0:
        plan.append((frame, level))
        frame, level = frame - 1, level - 1
    plan += [(f, 0) for f in range(frame, -1, -1)]
    return plan[::-1]


def history(levels: list[torch.Tensor], unit: int, stage: int) -> list[torch.Tensor]:
    """The history clips of ``unit`` at ``stage`` from :func:`pyramid` levels of the generated latents, oldest first,
    consecutive frames of one resolution as one clip: ``[(B, C, t, h_s, w_s), …]``."""
    clips: list[torch.Tensor] = []
    plan = history_plan(unit, stage)
    i = 0
    while i < len(plan):
        j = i
        while j + 1 < len(plan) and plan[j + 1][1] == plan[i][1]:
            j += 1
        first, level = plan[i][0], plan[i][1]
        clips.append(levels[level][:, :, first:plan[j][0] + 1])
        i = j + 1
    return clips
