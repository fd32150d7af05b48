"""UltraViCo (Zhao et al., arXiv 2511.20123): decay the attention of far token pairs, after RoPE.

Every patched self-attention of a Wan expert scores q·(k − k̄)/√d (K centred over the sequence), turns the
logit ``s`` of every far pair (``|m − n| > F·N/2`` tokens, F tokens per latent frame, N training latent frames)
into ``min(s, α·s)``, hides frames ≥ N from queries of frame 0, and attends (``core/far_decay.py``: exact
``flex_attention`` ``score_mod`` on a GPU, exact blocked attention on a CPU). The official kernel hard-codes
F = 1560 and N = 21 (Wan 1.3B at 480×832 only); longvid derives both from the grid and the model, so any size
and frame count work.

Gate (a decision the official code does not make): the rule already changes a native-length video (25 % of
pairs are "far" at L = N), so longvid applies it only when L > N (``gate: true``); ``gate: false`` is the
official behaviour. Torch-free module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional

from longvid.methods.base import Method, MethodConfig


@dataclass
class UltraViCoConfig(MethodConfig):
    """Settings of ``methods.ultravico``."""

    alpha: float = 0.9
    """Far positive logits are multiplied by alpha (official 0.9; smaller = more decay, less consistency)."""
    train_frames: Optional[int] = None
    """N, training length in latent frames. None = the model's native length (Wan: 21)."""
    rule: Literal["token", "frame"] = "token"
    """token = official far rule on flattened token distance; frame = |frame distance| > N // 2."""
    first_frame: Literal["official", "exact", "off"] = "official"
    """Hide frames >= N from frame-0 queries: official indices (with their off-by-ones), exact, or off."""
    center_k: bool = True
    """Centre K over the sequence before scoring (the official kernel's smooth_k; the rule needs it for parity)."""
    gate: bool = True
    """Apply only when the video is longer than N latent frames (longvid); false = always (official)."""
    layers: Optional[List[int]] = None
    """Layer indices (per denoiser) to patch. None = every block (official)."""
    steps: List[float] = field(default_factory=lambda: [0.0, 1.0])
    """[start, end) fraction of the schedule where it applies (official: all steps)."""

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ValueError(f"methods.ultravico.alpha must be in (0, 1], got {self.alpha}")
        if self.train_frames is not None and self.train_frames < 1:
            raise ValueError(f"methods.ultravico.train_frames must be at least 1, got {self.train_frames}")
        if len(self.steps) != 2 or not 0 <= self.steps[0] < self.steps[1] <= 1:
            raise ValueError(f"methods.ultravico.steps must be [start, end) with 0 <= start < end <= 1, got "
                             f"{self.steps}")


class UltraViCo(Method):
    """UltraViCo: decay far-pair attention logits after RoPE (2025)"""

    name = "ultravico"
    Config = UltraViCoConfig
    seams = frozenset({"attention"})
    families = frozenset({"wan"})

    @classmethod
    def patched_sites(cls, config: UltraViCoConfig, spec: Any) -> frozenset[str]:
        return frozenset({"full"})

    def apply(self, adapter: Any, ctx: Any) -> None:
        from longvid.core.processors import StepWindow

        cfg = self.config
        spec = adapter.spec
        train = cfg.train_frames or spec.latent_frames(spec.native_frames)
        if cfg.gate and ctx.latent_frames <= train:
            return  # within the trained length: vanilla attention, untouched
        sites = adapter.attention_sites("full")
        layers = 1 + max(s.layer for s in sites)
        chosen = set(range(layers)) if cfg.layers is None else set(cfg.layers)
        if chosen - set(range(layers)):
            from longvid.errors import MethodError

            raise MethodError(f"methods.ultravico.layers: this model has {layers} layers per denoiser "
                              f"(0..{layers - 1}), got {sorted(chosen)}")
        op = FarDecayOp(cfg, train)
        for site in sites:
            if site.layer in chosen:
                self.on_remove(adapter.install_op(site, StepWindow(op, ctx, *cfg.steps), self.name))


class FarDecayOp:
    """The attention op: ``(q, k, v, layout) -> out`` with the far-pair rule on the layout's grid."""

    def __init__(self, config: UltraViCoConfig, train_frames: int):
        self.config, self.train_frames = config, train_frames

    def __call__(self, q, k, v, layout):
        from longvid.core.far_decay import far_decay_attention

        c = self.config
        return far_decay_attention(q, k, v, tokens_per_frame=layout.height * layout.width,
                                   train_frames=self.train_frames, alpha=c.alpha, rule=c.rule,
                                   first_frame=c.first_frame, center_k=c.center_k)
