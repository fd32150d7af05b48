"""Pyramid Flow's flow-matching schedule: three spatial stages, each a short flow between its own end points.

Stage ``k`` of ``K = 3`` (γ = 1/3, 1000 training steps) flows from ``start_sigma[k]`` to ``end_sigma[k]`` on the
global σ grid ``t/1000`` (t = 1000 … 1, then 0). Within a stage the state is ``x_r = r·start + (1 − r)·end``
with a *local* ratio ``r`` from 1 to 0 and the DiT predicts ``v = start − end``, so a step is
``x ← x + (r_next − r)·v``. A stage's later start is raised from the nominal ``s`` to ``2s/(1+s)`` (in general
``1 − (1−s)/(√(1+1/γ)·s + (1−s))``) because the jump into it (nearest 2× upsampling, then ``α·x + β·n``)
re-noises with block noise whose 2×2 blocks sum to zero (notes §5.1–5.2). All values here are the notes'
reference values; the stage-jump noise is the exact closed form (the official ``MultivariateNormal`` loop is
slow and fails its Cholesky on current torch) drawn from the caller's generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PyramidSchedule:
    """The stage tables of a pyramid flow-matching schedule (defaults: the released models')."""

    stages: int = 3
    gamma: float = 1.0 / 3.0
    train_steps: int = 1000

    @property
    def stage_range(self) -> list[float]:
        return [k / self.stages for k in range(self.stages + 1)]  # [0, 1/3, 2/3, 1]

    def _sigma(self, index: int) -> float:
        """σ of the global grid (t = 1000 … 1, then 0) at ``index``."""
        return 0.0 if index >= self.train_steps else (self.train_steps - index) / self.train_steps

    @property
    def ori_start_sigmas(self) -> list[float]:
        """Nominal start σ of every stage: {1.0, 0.667, 0.334}."""
        return [self._sigma(int(r * self.train_steps)) for r in self.stage_range[:-1]]

    @property
    def end_sigmas(self) -> list[float]:
        """End σ of every stage: {0.667, 0.334, 0.0}."""
        return [self._sigma(int(r * self.train_steps)) for r in self.stage_range[1:]]

    @property
    def start_sigmas(self) -> list[float]:
        """Corrected start σ (the renoised jump's level): {1.0, 0.80024, 0.50075}."""
        root = math.sqrt(1.0 + 1.0 / self.gamma)
        return [s if k == 0 else 1.0 - (1.0 - s) / (root * s + (1.0 - s))
                for k, s in enumerate(self.ori_start_sigmas)]

    @property
    def stage_timesteps(self) -> list[tuple[float, float]]:
        """``(t_max, t_min)`` of every stage, cut where the cumulative flow length crosses: [1000→744], [744→386],
        [386→1]."""
        lengths = [s - e for s, e in zip(self.start_sigmas, self.end_sigmas)]
        total = sum(lengths)
        ratios = [sum(lengths[:k]) / total for k in range(self.stages + 1)]
        grid = [float(self.train_steps - i) for i in range(self.train_steps)]  # 1000 … 1
        at = [grid[min(int(r * self.train_steps), self.train_steps - 1)] for r in ratios]
        return [(at[k], at[k + 1]) for k in range(self.stages)]

    def timesteps(self, steps: int, stage: int) -> torch.Tensor:
        """The ``steps`` global timesteps of a stage (what the DiT is told): ``linspace(t_max, t_min + (t_max −
        t_min)/1000, steps)``, float64 ``(steps,)``."""
        t_max, t_min = self.stage_timesteps[stage]
        return torch.linspace(t_max, t_min + (t_max - t_min) / self.train_steps, steps, dtype=torch.float64)

    def ratios(self, steps: int) -> torch.Tensor:
        """Local ratios ``r`` of a stage's steps and the end: ``linspace(1, 0.001, steps)`` then 0, float64
        ``(steps + 1,)``."""
        return torch.cat([torch.linspace(1.0, 0.001, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])

    def jump(self, stage: int) -> tuple[float, float]:
        """``(α, β)`` of the jump into ``stage`` ≥ 1: ``α = 1/(√(1+1/γ)·e + (1−e))``, ``β = α·e/√γ`` with ``e`` the
        stage's nominal start σ (stage 1: 0.59988, 0.69303; stage 2: 0.74963, 0.43366)."""
        e = self.ori_start_sigmas[stage]
        alpha = 1.0 / (math.sqrt(1.0 + 1.0 / self.gamma) * e + (1.0 - e))
        return alpha, alpha * e / math.sqrt(self.gamma)


def euler_step(x: torch.Tensor, v: torch.Tensor, r: float, r_next: float) -> torch.Tensor:
    """``x + (r_next − r)·v`` in float32, returned in ``v``'s dtype (the official update: latents stay in the
    model's dtype between steps)."""
    return (x.float() + (r_next - r) * v.float()).to(v.dtype)


def block_noise(shape: tuple[int, ...], gamma: float, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Noise whose every 2×2 spatial block is ``N(0, Σ)``, ``Σ = (1+γ)I − γ11ᵀ`` (singular at γ = 1/3: the block
    sums to 0). Exact closed form: ``√(1+γ)·(z − z̄) + √(1−3γ)·z̄`` with ``z ~ N(0, I₄)`` per block and ``z̄`` its
    mean. ``shape`` is ``(..., H, W)`` with even H, W."""
    if gamma > 1.0 / 3.0 + 1e-12:
        raise ValueError(f"block noise needs gamma <= 1/3 (a covariance), got {gamma}")
    *lead, h, w = shape
    # drawn where the generator lives (a CPU generator draws the same numbers for every device), then moved
    z = torch.randn(*lead, h // 2, 2, w // 2, 2, generator=generator, dtype=torch.float64,
                    device=generator.device if generator is not None else device)
    mean = z.mean(dim=(-3, -1), keepdim=True)  # (…, h/2, 1, w/2, 1) block means
    n = math.sqrt(1.0 + gamma) * (z - mean) + math.sqrt(max(0.0, 1.0 - 3.0 * gamma)) * mean
    return n.reshape(*lead, h, w).to(device=device, dtype=dtype)


def stage_jump(x: torch.Tensor, alpha: float, beta: float, gamma: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Into the next stage: nearest 2× upsampling of ``x`` (B, C, T, h, w), then ``α·x + β·block noise``."""
    b, c, t, h, w = x.shape
    up = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), scale_factor=2, mode="nearest")
    up = up.reshape(b, t, c, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)  # (B, C, T, 2h, 2w)
    noise = block_noise(tuple(up.shape), gamma, generator, dtype=up.dtype, device=up.device)
    return alpha * up + beta * noise
