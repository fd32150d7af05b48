"""Length extrapolation by editing rotary positions: RIFLEx, NTK-aware scaling, position interpolation, YaRN.

All four change only the **temporal** band of a DiT's RoPE (Wan: 44 of 128 dims), on every expert, through the
RoPE seam (``core/rope.py``: a named, removable hook that rebuilds the edited table in float64 and casts it as
diffusers does, so an identity edit is bit-exact). With L test and N training latent frames (Wan: N = 21):

- ``riflex`` (Zhao et al., ICML 2025): the intrinsic frequency k gets θ_k = 0.9·2π/L, only when L > N_k (the
  official gate; Wan k = 6, N_k = 51: **a no-op at 2×**, active from 3×).
- ``ntk``: base' = base·s^(d/(d−2)), s = L/N.
- ``pi``: positions divided by s = L/N.
- ``yarn``: NTK-by-parts — frequencies that complete at least ``high`` turns over N frames keep their value,
  those below ``low`` turns are divided by s, a linear ramp between (FreeLOC's baseline: high 1, low 0.6).

They are mutually exclusive (one RoPE edit per model) and do not combine with FreeNoise context windows, which
keep positions window-local. This module is torch-free; docs/methods/rope-extrapolation.md has the details.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from longvid.methods.base import Method, MethodConfig


class RopeMethod(Method):
    """Shared declarations and installation; a subclass says how the temporal axis changes (:meth:`edit`)."""

    seams = frozenset({"rope"})
    families = frozenset({"wan"})

    @classmethod
    def patched_sites(cls, config: Any, spec: Any) -> frozenset[str]:
        return frozenset({"rope"})

    @classmethod
    def check(cls, config: Any, recipe: Any, spec: Any) -> list[tuple[str, str]]:
        freenoise = recipe.methods.get("freenoise")
        if freenoise is not None:
            from longvid.methods.freenoise import FreeNoise

            if FreeNoise.fusion_for(freenoise, spec) == "denoiser":
                return [(f"methods.{cls.name}", "FreeNoise context windows keep positions window-local, so a RoPE "
                                                "edit for the whole length would be wrong inside them; use "
                                                "methods.freenoise.fusion=none with it")]
        return []

    def edit(self, test_frames: int, train_frames: int, spec: Any, dim: int):
        """The temporal :class:`~longvid.core.rope.AxisEdit`, or None when the method leaves this length alone."""
        raise NotImplementedError

    def apply(self, adapter: Any, ctx: Any) -> None:
        from longvid.core.rope import apply_rope_edits, check_stock_tables
        from longvid.errors import MethodError

        spec = adapter.spec
        train = spec.latent_frames(spec.native_frames)
        for denoiser, module in adapter.rope_modules.items():
            edit = self.edit(ctx.latent_frames, train, spec, module.t_dim)
            if edit is None:
                continue
            if not check_stock_tables(module, spec.rope_theta):
                raise MethodError(f"methods.{self.name}: {denoiser}'s RoPE tables are not the stock ones (base "
                                  f"{spec.rope_theta}); they cannot be edited safely")
            self.on_remove(adapter.claim_module(module, f"{denoiser}.rope", self.name))
            self.on_remove(apply_rope_edits(module, {"t": edit}, f"longvid.{self.name}.rope", spec.rope_theta))


def _scale(config_scale: Optional[float], test_frames: int, train_frames: int) -> float:
    return float(config_scale) if config_scale is not None else test_frames / train_frames


@dataclass
class RiflexConfig(MethodConfig):
    """Settings of ``methods.riflex``."""

    k: Optional[int] = None
    """Intrinsic temporal frequency, 1-based. None = the family's preset (Wan: 6, period N_k = 51 latent frames)."""
    factor: float = 0.9
    """θ_k = factor·2π/L (the official code's 0.9 keeps the video below 90 % of one period)."""
    gate: bool = True
    """Apply only when L > N_k (official). false = always (at L < 0.9·N_k that *raises* θ_k)."""

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"methods.riflex.k is 1-based: at least 1, got {self.k}")
        if not 0 < self.factor <= 1:
            raise ValueError(f"methods.riflex.factor must be in (0, 1], got {self.factor}")


class Riflex(RopeMethod):
    """RIFLEx: lower the intrinsic temporal RoPE frequency (ICML 2025)"""

    name = "riflex"
    Config = RiflexConfig

    @classmethod
    def check(cls, config: RiflexConfig, recipe: Any, spec: Any) -> list[tuple[str, str]]:
        problems = super().check(config, recipe, spec)
        if config.k is None and spec.riflex_k is None:
            problems.append(("methods.riflex.k", f"{spec.name} has no RIFLEx preset; set k (1-based)"))
        return problems

    @classmethod
    def active_settings(cls, spec: Any) -> dict[str, Any]:
        return {"gate": False}  # Wan at 2x (L = 41) is below N_k = 51: the official gate keeps it off

    def edit(self, test_frames, train_frames, spec, dim):
        from longvid.core.rope import inverse_frequencies, riflex

        k = self.config.k or spec.riflex_k
        if k > dim // 2:
            from longvid.errors import MethodError

            raise MethodError(f"methods.riflex.k: the temporal band has {dim // 2} frequencies, got k={k}")
        period = round(2 * math.pi / float(inverse_frequencies(dim, spec.rope_theta)[k - 1]))  # N_k
        if self.config.gate and test_frames <= period:
            return None
        return riflex(k, test_frames, self.config.factor)


@dataclass
class ScaleConfig(MethodConfig):
    """A scale ``s`` (None = test latent frames / training latent frames; at or below 1 nothing changes)."""

    scale: Optional[float] = None

    def __post_init__(self):
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")


class Ntk(RopeMethod):
    """NTK-aware RoPE scaling of the temporal axis"""

    name = "ntk"
    Config = ScaleConfig

    def edit(self, test_frames, train_frames, spec, dim):
        from longvid.core.rope import ntk

        s = _scale(self.config.scale, test_frames, train_frames)
        return ntk(s, dim) if s > 1 else None


class PositionInterpolation(RopeMethod):
    """Position interpolation (PI) on the temporal axis"""

    name = "pi"
    Config = ScaleConfig

    def edit(self, test_frames, train_frames, spec, dim):
        from longvid.core.rope import position_interpolation

        s = _scale(self.config.scale, test_frames, train_frames)
        return position_interpolation(s) if s > 1 else None


@dataclass
class YarnConfig(ScaleConfig):
    """Settings of ``methods.yarn``."""

    low: float = 0.6
    """Frequencies turning at most this often over the training frames are interpolated (divided by s)."""
    high: float = 1.0
    """Frequencies turning at least this often keep their value; a linear ramp between ``low`` and ``high``."""

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.low < self.high:
            raise ValueError(f"methods.yarn needs 0 <= low < high, got low={self.low} high={self.high}")


class Yarn(RopeMethod):
    """YaRN (NTK-by-parts) on the temporal axis"""

    name = "yarn"
    Config = YarnConfig

    def edit(self, test_frames, train_frames, spec, dim):
        from longvid.core.rope import yarn

        s = _scale(self.config.scale, test_frames, train_frames)
        return yarn(s, train_frames, self.config.low, self.config.high) if s > 1 else None
