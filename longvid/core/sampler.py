"""longvid's own denoising loop: one short function for every model and method.

The denoiser is a callable ``denoise(x, t) -> prediction`` (guidance included) that methods may wrap
(FreeNoise's context windows); the scheduler is any diffusers scheduler. Owning the loop (instead of calling
a diffusers pipeline) is what lets noise rescheduling, window fusion and stage transitions plug in. The order
of operations mirrors diffusers==0.42.1 ``WanPipeline`` / ``AnimateDiffPipeline``, so the vanilla result is
numerically the pipeline's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from longvid.core.context import GenerationContext

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def set_timesteps(scheduler, steps: int, device: torch.device) -> torch.Tensor:
    """Configure ``scheduler`` for ``steps`` steps and return its timesteps."""
    scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # as WanPipeline does: no timestep lookup (and no device sync) per step
    return scheduler.timesteps


@torch.no_grad()
def sample(denoise: Denoiser, x: torch.Tensor, scheduler, timesteps: torch.Tensor, *,
           step_kwargs: dict[str, Any] | None = None, ctx: GenerationContext | None = None,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Run the reverse process from latents ``x`` (B, C, F, H, W) over ``timesteps``; returns the final latents."""
    step_kwargs = step_kwargs or {}
    for i, t in enumerate(timesteps):
        if ctx is not None:
            ctx.step, ctx.timestep = i, float(t)
        model_in = scheduler.scale_model_input(x, t)  # identity for flow-matching schedulers
        prediction = denoise(model_in, t)
        x = scheduler.step(prediction, t, x, **step_kwargs, return_dict=False)[0]
        if callback is not None:
            callback(i + 1, len(timesteps), x)
    return x
