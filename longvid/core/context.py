"""State shared between the runner, the adapters and the methods of one generation.

Nothing here is global: the runner creates one :class:`GenerationContext` per generation and hands it to
every method's ``apply()``. Adapters describe where methods may attach with :class:`AttentionSite`s and
keep each site's :class:`TokenLayout` up to date through forward-pre-hooks, so attention processors always
know the (frames, height, width) grid of the tokens they see, at any resolution, batch or frame count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SiteKind = Literal["temporal", "spatial", "full", "cross"]


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens of one attention call map onto the video's latent grid.

    ``kind="temporal"``: a UNet temporal attention. q/k/v are ``(batch*height*width, heads, frames, D)``; the
    leading axis is ordered (b, h, w) row-major, exactly as AnimateDiff's motion modules flatten it.
    ``kind="full"``: a DiT 3D self-attention. q/k/v are ``(batch, heads, frames*height*width, D)`` with tokens in
    (f, h, w) raster order, exactly as Wan's patch embedding flattens them.
    ``kind="spatial"``: one frame's tokens, ``(batch*frames, heads, height*width, D)``.
    """

    kind: SiteKind
    batch: int
    frames: int
    height: int
    width: int

    @property
    def tokens_per_frame(self) -> int:
        """Consecutive tokens of a sequence that share one frame (1 for temporal attention)."""
        return self.height * self.width if self.kind == "full" else 1


@dataclass
class AttentionSite:
    """One attention module a method may patch, as described by the model adapter.

    Attributes:
        name: dotted module path from the pipeline (``transformer_2.blocks.3.attn1``,
            ``unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1``).
        module: the diffusers ``Attention`` / ``WanAttention`` module.
        kind: ``temporal`` (attends over frames only), ``spatial``, ``full`` (3D), or ``cross`` (text
            cross-attention; its layout is the grid of its queries).
        level: UNet resolution level, 0 = full latent resolution; 0 for every DiT block.
        part: ``encoder`` (UNet down blocks), ``middle``, ``decoder`` (up blocks), or ``""`` for DiTs.
        denoiser: the pipeline component that owns the site (``transformer``, ``transformer_2``, ``unet``):
            Wan 2.2 A14B has two experts with a site of each kind per block.
        layer: position of the site among its denoiser's sites of the same kind (0-based, model order): the
            index per-layer knobs and presets use; it restarts for every denoiser.
        block: the transformer block that owns ``module`` (for block-level hooks), or None.
        pos_embed: an absolute positional-embedding module the block adds to this attention's input
            (AnimateDiff's sinusoidal temporal PE), or None when positions are rotary (Wan) or absent.
        layout: the latest :class:`TokenLayout`, refreshed by the adapter before every denoiser call.
    """

    name: str
    module: Any
    kind: SiteKind
    level: int = 0
    part: str = ""
    denoiser: str = ""
    layer: int = 0
    block: Any = None
    pos_embed: Any = None
    layout: TokenLayout | None = None


@dataclass
class GenerationContext:
    """Per-stage state shared by the runner, the loop, guidance and the methods of one stage.

    ``step`` is the *absolute* index into the stage's full schedule of ``total_steps`` (a refine stage with
    strength 0.7 of 50 steps runs steps 15..49), so step windows (``steps: [0.0, 0.5]``) mean the same
    fraction of the schedule in every stage and after a resume. ``cfg_branch`` says which guidance branch the
    current denoiser call computes: ``cond``, ``uncond``, or ``both`` when they are batched together
    ([uncond, cond] along the batch axis).
    """

    num_frames: int
    height: int
    width: int
    latent_frames: int
    latent_height: int
    latent_width: int
    total_steps: int = 0
    step: int = 0
    timestep: float | None = None
    cfg_branch: Literal["cond", "uncond", "both"] = "both"
    stage: str = "main"
    stage_index: int = 0
    start_step: int = 0
    first_size: tuple[int, int] | None = None
    """``(height, width)`` of the recipe's first stage: where the composition is made at the model's own size."""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """``step / total_steps``: where in the schedule the current step is (0 at the first step)."""
        return self.step / max(self.total_steps, 1)
