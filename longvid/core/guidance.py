"""Classifier-free guidance as one wrapper around an adapter's unguided prediction (k-diffusion's CFGDenoiser).

Adapters only say how to run one denoiser (``predict``), which denoiser handles a timestep (``expert``) and
whether cond and uncond run as one batch (``batched_cfg``: AnimateDiffPipeline does, WanPipeline calls the
model twice). Guidance itself lives here, once, for every family: it picks the scale of the active expert
(Wan 2.2's ``guidance_scale_2`` for the low-noise one), tells the methods which branch is running through
``ctx.cfg_branch``, and combines ``uncond + s * (cond - uncond)`` in the order the pipelines do, so vanilla
generation stays bit-identical to diffusers.
"""

from __future__ import annotations

from typing import Callable

import torch

from longvid.core.context import GenerationContext
from longvid.recipe.schema import SamplerConfig

#: ``denoise(x, t, cond) -> prediction``: the one signature of the denoiser seam (methods wrap it).
Denoise = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def expert_scales(sampler: SamplerConfig) -> tuple[float, float]:
    """Guidance of the first denoiser and of every later one (``guidance_scale_2``, default the first's)."""
    first = float(sampler.guidance_scale)
    later = sampler.guidance_scale_2 if sampler.guidance_scale_2 is not None else sampler.guidance_scale
    return first, float(later)


def guided(adapter, sampler: SamplerConfig, ctx: GenerationContext | None = None) -> Denoise:
    """The guided denoiser of ``adapter`` for a run with ``sampler``; sets ``ctx.cfg_branch`` per call."""
    scales = expert_scales(sampler)

    def set_branch(branch: str) -> None:
        if ctx is not None:
            ctx.cfg_branch = branch

    guided_run = scales[0] > 1.0  # as WanPipeline: guidance_scale alone turns CFG on, for every expert

    def denoise(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        expert = adapter.expert(t)
        scale = scales[min(expert, 1)]  # with CFG on, each expert blends with its own scale (even <= 1)
        if not guided_run or cond.negative is None:
            set_branch("cond")
            return adapter.predict(x, t, cond.positive, expert)
        if adapter.batched_cfg:  # one call on [uncond, cond] (AnimateDiffPipeline's layout)
            set_branch("both")
            pred = adapter.predict(torch.cat([x] * 2), t, torch.cat([cond.negative, cond.positive]), expert)
            uncond, text = pred.chunk(2)
        else:  # two calls, cond first (WanPipeline's order)
            set_branch("cond")
            text = adapter.predict(x, t, cond.positive, expert)
            set_branch("uncond")
            uncond = adapter.predict(x, t, cond.negative, expert)
        return uncond + scale * (text - uncond)

    return denoise
