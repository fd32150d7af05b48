"""The stage plan of a recipe: which stages run, in what order, at what size, with which sampler and methods.

Torch-free, so ``longvid show`` / ``validate`` report an impossible plan before any model loads. A recipe
without ``stages`` is one stage named ``main`` at the ``video`` size. With ``stages`` (an ordered mapping),
the first stage generates from noise and every later one refines the previous stage's result:

    stage 1 (noise -> x1 at its size) -> hand-off (pixel: decode, resize, encode | latent: resize)
        -> re-noise to the start of stage 2's schedule (``strength``) -> stage 2 -> ... -> the output

The start of a stage's schedule follows diffusers' video-to-video rule (``get_timesteps``): of ``steps``
steps, the last ``int(steps * strength)`` run (shift 9, strength 0.7, 50 steps: steps 15..49, t = 954,
sigma = 0.9546, 35 steps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from longvid.recipe.schema import Recipe, SamplerConfig, StageConfig

#: The name of the implicit single stage of a recipe without ``stages``.
MAIN_STAGE = "main"


@dataclass(frozen=True)
class StagePlan:
    """One stage, fully resolved: sizes, the effective sampler, where its schedule starts, its methods."""

    name: str
    index: int
    num_frames: int
    height: int
    width: int
    sampler: SamplerConfig
    strength: float = 1.0
    upsample: str | None = None  # None for the first stage (it starts from noise)
    interpolation: str = "bilinear"
    methods: tuple[str, ...] = ()

    @property
    def start_step(self) -> int:
        return start_step(self.sampler.steps, self.strength)

    @property
    def steps_run(self) -> int:
        return self.sampler.steps - self.start_step


def start_step(steps: int, strength: float) -> int:
    """Index of the first step run at ``strength`` (diffusers 0.42.1 ``get_timesteps`` of the v2v pipelines)."""
    init = min(int(steps * strength), steps)
    return max(steps - init, 0)


def stage_sampler(base: SamplerConfig, stage: StageConfig) -> SamplerConfig:
    """The recipe's sampler with the stage's set (non-null) keys replacing it."""
    changes = {k: v for k, v in dataclasses.asdict(stage.sampler).items() if v is not None}
    return dataclasses.replace(base, **changes)


def plan_stages(recipe: Recipe) -> list[StagePlan]:
    """The stages of a resolved recipe in run order (assumes ``validate`` found no problem)."""
    video = recipe.video
    if not recipe.stages:
        sampler = recipe.sampler
        spec = _spec(recipe)
        if spec is not None and spec.loop == "units":  # an autoregressive family counts its loop in latent units
            sampler = dataclasses.replace(sampler, steps=spec.latent_frames(video.num_frames))
        return [StagePlan(MAIN_STAGE, 0, video.num_frames, video.height, video.width, sampler,
                          methods=tuple(recipe.methods))]
    plans = []
    for i, (name, stage) in enumerate(recipe.stages.items()):
        plans.append(StagePlan(
            name=name, index=i,
            num_frames=stage.num_frames or video.num_frames,
            height=stage.height or video.height, width=stage.width or video.width,
            sampler=stage_sampler(recipe.sampler, stage),
            strength=stage.strength,
            upsample=stage.upsample if i else None,
            interpolation=stage.interpolation,
            methods=tuple(methods_in(recipe, name)),
        ))
    return plans


def _spec(recipe: Recipe):
    from longvid import registry

    return registry.model_spec(recipe.model.family) if recipe.model.family in registry.MODELS else None


def methods_in(recipe: Recipe, stage: str) -> list[str]:
    """Names of the methods active in ``stage``."""
    return [m for m, cfg in recipe.methods.items() if _scoped(cfg) is None or stage in _scoped(cfg)]


def _scoped(config: Any) -> list[str] | None:
    return getattr(config, "stages", None)
