"""FreeLOC (Westlake-AGI-Lab, CVPR 2026, arXiv 2603.25209): per-layer VRPR or TSA for length extrapolation.

Beyond the trained length, every Wan self-attention layer gets one of two treatments (``core/freeloc_geometry.py``
states both; ``core/branch_attention.py`` computes them exactly, as disjoint branches merged by one softmax):

- **VRPR** (layers sensitive to relative positions): temporal positions re-encoded in five token bands — exact
  near the query, grouped by 2 then by 8 farther away, clipped at the largest trained relative position (20);
- **TSA** (layers sensitive to context length): dense attention within 8 frames, raster stripes 8..24 frames
  away, and first/last-frame sinks with re-encoded positions.

Which layer gets which comes from a **preset**: the official list for Wan 2.1 1.3B ships built in (TSA on 17
of 30 layers), and ``longvid probe`` writes one for any other model (``methods.freeloc.preset``). A model with
neither is refused with the command to run. The released code crashes on every forward (notes §1.7); this is
written from the notes' restatement of its formulas, with its quirks as options (the one-frame VRPR gap, the
hard-coded future sink frame 78, 128-token band rounding). Torch-free module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Literal, Optional

from longvid.methods.base import Method, MethodConfig

#: Built-in layer presets: the model's fingerprint (per denoiser: layers, attention width) -> TSA layers.
BUILTIN_PRESETS = {
    "wan2.1-t2v-1.3b": {
        "source": "FreeLOC's released list for Wan2.1-T2V-1.3B (default_rope_relative_layers)",
        "fingerprint": {"transformer": {"layers": 30, "dim": 1536}},
        "tsa": {"transformer": [0, 1, 4, 6, 7, 9, 10, 11, 13, 14, 15, 16, 18, 22, 23, 24, 25]},
    },
}
PRESET_FORMAT = "longvid.freeloc.preset/1"


@dataclass
class FreeLocConfig(MethodConfig):
    """Settings of ``methods.freeloc``."""

    preset: Optional[str] = None
    """A preset JSON written by ``longvid probe``. None = the built-in preset for the loaded model."""
    tsa_layers: Optional[List[int]] = None
    """Layer indices (per denoiser) that take TSA, every other one VRPR; overrides any preset."""
    vrpr_gap_fix: bool = False
    """Close the official one-frame gap between VRPR's diagonal and middle bands (2.2 % of pairs at 81 frames
    attend to nothing there). false = official."""
    sink_future: Literal["auto", "official"] = "auto"
    """TSA's future sink: the last 3 latent frames at any length (auto), or frames after 78 (official; empty
    below 79 latent frames)."""
    round_to: int = 128
    """Token bands rounded up to multiples of this (the official flex block size); 1 = exact frame bands."""
    gate: bool = True
    """Apply only beyond the trained length (a native-length video is untouched)."""
    steps: List[float] = field(default_factory=lambda: [0.0, 1.0])
    """[start, end) fraction of the schedule where it applies (official: every step)."""

    def __post_init__(self):
        if self.tsa_layers is not None and any(i < 0 for i in self.tsa_layers):
            raise ValueError(f"methods.freeloc.tsa_layers must be layer indices >= 0, got {self.tsa_layers}")
        if self.round_to < 1:
            raise ValueError(f"methods.freeloc.round_to must be at least 1, got {self.round_to}")
        if len(self.steps) != 2 or not 0 <= self.steps[0] < self.steps[1] <= 1:
            raise ValueError(f"methods.freeloc.steps must be [start, end) with 0 <= start < end <= 1, got {self.steps}")


def read_preset(path: str) -> dict:
    """A probe-written preset, checked: ``{"format", "fingerprint": {den: {layers, dim}}, "tsa": {den: [..]}}``."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read '{path}' ({err.strerror or err}); write one with `longvid probe`") from None
    except ValueError as err:
        raise ValueError(f"'{path}' is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != PRESET_FORMAT:
        raise ValueError(f"'{path}' is not a FreeLOC preset written by `longvid probe` (format {PRESET_FORMAT})")
    fingerprint, tsa = data.get("fingerprint"), data.get("tsa")
    if not isinstance(fingerprint, dict) or not isinstance(tsa, dict) or set(tsa) - set(fingerprint) or any(
            not isinstance(v, list) or not all(isinstance(i, int) and i >= 0 for i in v) for v in tsa.values()):
        raise ValueError(f"'{path}' has no valid fingerprint/tsa layer lists")
    return data


class FreeLoc(Method):
    """FreeLOC: per-layer VRPR or tiered sparse attention beyond the trained length (CVPR 2026)"""

    name = "freeloc"
    Config = FreeLocConfig
    seams = frozenset({"attention", "rope"})
    families = frozenset({"wan"})

    @classmethod
    def patched_sites(cls, config: FreeLocConfig, spec: Any) -> frozenset[str]:
        return frozenset({"full", "rope"})  # it re-encodes positions itself: no other RoPE edit may run with it

    @classmethod
    def check(cls, config: FreeLocConfig, recipe: Any, spec: Any) -> list[tuple[str, str]]:
        if config.preset is None:
            return []
        try:
            read_preset(config.preset)
        except ValueError as err:
            return [("methods.freeloc.preset", str(err))]
        return []

    @classmethod
    def active_settings(cls, spec: Any) -> dict[str, Any]:
        return {"tsa_layers": [0]}  # (tiny models have no shipped preset)

    def apply(self, adapter: Any, ctx: Any) -> None:
        from longvid.core.processors import StepWindow

        cfg = self.config
        spec = adapter.spec
        train = spec.latent_frames(spec.native_frames)
        if cfg.gate and ctx.latent_frames <= train:
            return
        tsa = self._tsa_layers(adapter)
        ops = {kind: FreeLocOp(kind, cfg) for kind in ("vrpr", "tsa")}
        for site in adapter.attention_sites("full"):
            op = ops["tsa" if site.layer in tsa.get(site.denoiser, ()) else "vrpr"]
            self.on_remove(adapter.install_op(site, StepWindow(op, ctx, *cfg.steps), self.name))

    def _tsa_layers(self, adapter: Any) -> dict[str, set[int]]:
        from longvid.errors import MethodError

        prints = fingerprint(adapter)
        if self.config.tsa_layers is not None:
            layers = set(self.config.tsa_layers)
            too_big = [i for i in layers if any(i >= p["layers"] for p in prints.values())]
            if too_big:
                counts = ", ".join(f"{d}: {p['layers']}" for d, p in prints.items())
                raise MethodError(f"methods.freeloc.tsa_layers: layers {sorted(too_big)} do not exist ({counts} "
                                  "layers)")
            return {den: layers for den in prints}
        if self.config.preset is not None:
            preset = read_preset(self.config.preset)
            if preset["fingerprint"] != prints:
                raise MethodError(f"methods.freeloc.preset: '{self.config.preset}' was probed on another model "
                                  f"({preset['fingerprint']}), this one is {prints}; probe it with `longvid probe`")
            return {den: set(v) for den, v in preset["tsa"].items()}
        for preset in BUILTIN_PRESETS.values():
            if preset["fingerprint"] == prints:
                return {den: set(v) for den, v in preset["tsa"].items()}
        raise MethodError(f"methods.freeloc: no FreeLOC layer preset for this model ({prints}); run `longvid probe "
                          "--recipe <this recipe> --out preset.json` and set methods.freeloc.preset=preset.json (or "
                          "set methods.freeloc.tsa_layers)")


def fingerprint(adapter: Any) -> dict[str, dict[str, int]]:
    """``{denoiser: {"layers": n, "dim": attention width}}``: what a layer preset is valid for."""
    out: dict[str, dict[str, int]] = {}
    for site in adapter.attention_sites("full"):
        entry = out.setdefault(site.denoiser, {"layers": 0, "dim": int(site.module.inner_dim)})
        entry["layers"] = max(entry["layers"], site.layer + 1)
    return out


class FreeLocOp:
    """The attention op of one treatment (``vrpr`` or ``tsa``): q/k before RoPE, exact branch attention."""

    pre_rope = True

    def __init__(self, kind: str, config: FreeLocConfig):
        self.kind, self.config = kind, config
        self._branches: dict[tuple, list] = {}
        self._cache: dict = {}

    def branches(self, grid: tuple[int, int, int]) -> list:
        if grid not in self._branches:
            from longvid.core.freeloc_attention import tsa_branches, vrpr_branches
            from longvid.core.freeloc_geometry import vrpr_settings

            c = self.config
            if self.kind == "vrpr":
                self._branches[grid] = vrpr_branches(grid, vrpr_settings(grid[0]), c.round_to, c.vrpr_gap_fix)
            else:
                self._branches[grid] = tsa_branches(grid, c.round_to, c.sink_future)
        return self._branches[grid]

    def __call__(self, q, k, v, layout, rotary):
        from longvid.core.branch_attention import branch_attention

        grid = (layout.frames, layout.height, layout.width)
        return branch_attention(q, k, v, rotary, self.branches(grid), grid, cache=self._cache)
