"""Pyramid Flow's autoregressive sampling: one latent frame per unit, three pyramid stages per unit (notes §5.2–5.3).

Unit 0 is generated as an image (no history, ``image_steps`` per stage, ``guidance``); every later unit is one
latent frame conditioned on all earlier ones through the temporal pyramid history (``video_steps``,
``video_guidance``), or on the last ``history_window`` of them (longvid's extension beyond the trained lengths:
the history is cut to N units and renumbered, so τ stays within what the model was trained on). In a unit, stage 0 starts from the unit's ¼-resolution noise, each jump upsamples and
re-noises (:func:`scheduler.stage_jump`) and each stage runs local Euler steps on the DiT's velocity with
classifier-free guidance over the batch ``[uncond, cond]``. Image-to-video puts the encoded image in as unit 0.

RNG plan (the official code uses the global RNG for the block noise and the i2v posterior; longvid draws everything
from the recipe's seeded generator, in this order): every unit's noise at once (full size, halved twice; the engine
draws it as it draws every family's noise), then the posterior sample of an i2v image, then the block noise of each
stage jump as it happens (unit by unit, stage 1 then 2). A run resumed at a unit boundary restores the unit noise and the generator state after the last unit, so
it continues bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from longvid.models.pyramid_flow.pyramid import history, pyramid, quarter, unit_noise
from longvid.models.pyramid_flow.scheduler import PyramidSchedule, euler_step, stage_jump

#: ``dit(clips, text, text_mask, pooled, timestep) -> velocity of clips[-1]`` (``dit_flux.flux_forward`` bound
#: to a model, or ``dit_sd3.sd3_forward``).
DiT = Callable[[list, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TextCondition:
    """One prompt's encoding, ``[uncond, cond]`` along the batch when guided: T5 states, their mask, pooled CLIP."""

    text: torch.Tensor  # (B', L, 4096)
    mask: torch.Tensor  # (B', L)
    pooled: torch.Tensor  # (B', P)


@dataclass
class UnitSettings:
    image_steps: tuple[int, int, int] = (20, 20, 20)
    video_steps: tuple[int, int, int] = (10, 10, 10)
    guidance: float = 7.0
    video_guidance: float = 5.0
    history_window: int | None = None  # None: every earlier unit (official); N: only the last N, τ renumbered


@dataclass
class UnitState:
    """What continuing after ``units`` finished units needs: their latents, every unit's noise, the generator."""

    units: int
    latents: torch.Tensor  # (B, 16, units, H, W) finished units (normalised latents)
    noise: torch.Tensor  # (B, 16, T, H/4, W/4)
    generator_state: torch.Tensor = field(default=None)


def guided(v: torch.Tensor, scale: float) -> torch.Tensor:
    """``v_u + s·(v_c − v_u)`` for a ``[uncond, cond]`` batch."""
    uncond, cond = v.chunk(2)
    return uncond + scale * (cond - uncond)


def generate_units(dit: DiT, condition: Callable[[int], TextCondition], shape: tuple[int, ...],
                   generator: torch.Generator, settings: UnitSettings, dtype: torch.dtype = torch.float32,
                   schedule: PyramidSchedule = PyramidSchedule(), first: torch.Tensor | None = None,
                   resume: UnitState | None = None,
                   on_unit: Callable[[int, Callable[[], UnitState]], None] | None = None,
                   noise: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Latents ``(B, 16, T, H, W)`` (``shape``) unit by unit. ``condition(u)`` is unit ``u``'s text (per-unit prompts
    switch here); ``first`` (B, 16, 1, H, W) an encoded image taken as unit 0 (i2v); ``on_unit(done, capture)``
    after each unit, ``capture()`` giving the :class:`UnitState` to resume from; ``noise`` the full-size noise
    already drawn from ``generator`` (the engine draws it; else it is drawn here, the same way)."""
    b, c, frames, h, w = shape
    device = torch.device(device) if device is not None else generator.device
    if resume is not None:
        noise = resume.noise.to(device)
        generated = [g.unsqueeze(2) for g in resume.latents.to(device).unbind(2)]
        if resume.generator_state is not None:  # (the engine restores its generator itself)
            generator.set_state(resume.generator_state)
    else:
        if noise is None:
            noise = unit_noise((b, c, frames, h, w), generator, dtype=dtype, device=generator.device).to(device)
        else:
            noise = quarter(noise.to(device, dtype))  # (B, C, T, H/4, W/4)
        generated = [first.to(device, dtype)] if first is not None else []
    for u in range(len(generated), frames):
        cond = condition(u)
        steps = settings.image_steps if u == 0 else settings.video_steps
        scale = settings.guidance if u == 0 else settings.video_guidance
        cfg = settings.guidance > 0  # the official gate: guidance 0 turns CFG off for the video units too
        # the history: every earlier unit, or the last `history_window` of them renumbered from τ = 0 (the
        # temporal positions then never pass the trained ones); `seen` is the current unit's place among them
        window = generated if settings.history_window is None else generated[-settings.history_window:]
        seen = len(window)
        levels = pyramid(torch.cat(window, 2)) if window else None
        x = noise[:, :, u:u + 1]  # (B, C, 1, H/4, W/4)
        for stage in range(schedule.stages):
            if stage > 0:
                x = stage_jump(x, *schedule.jump(stage), schedule.gamma, generator)
            past = history(levels, seen, stage) if levels is not None else []
            timesteps, ratios = schedule.timesteps(steps[stage], stage), schedule.ratios(steps[stage])
            for i, t in enumerate(timesteps):
                clips = [torch.cat([p] * 2) for p in past] + [torch.cat([x] * 2)] if cfg else past + [x]
                tb = torch.full((clips[-1].shape[0],), float(t), dtype=torch.float64).to(device, dtype)
                v = dit(clips, cond.text, cond.mask, cond.pooled, tb)  # (B', C, 1, h_s, w_s)
                v = guided(v, scale) if cfg else v
                x = euler_step(x, v, float(ratios[i]), float(ratios[i + 1]))
        generated.append(x)
        if on_unit is not None:
            # capture() describes the state right now: call it before returning (the next unit advances the RNG)
            on_unit(len(generated), lambda d=len(generated): UnitState(d, torch.cat(generated[:d], 2), noise,
                                                                       generator.get_state()))
    return torch.cat(generated, 2)
