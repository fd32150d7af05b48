"""Temporal context windows (FreeNoise): the window maths — views, weights, the fusion plan, weighted fusion.

A long clip of ``F`` frames is processed as overlapping *views* of the model's native length (``window``),
``stride`` frames apart; every view's output is weighted per position (``pyramid`` by default) and the
overlapping outputs are averaged per frame. Where the views run is up to the caller, at three granularities:

* per attention layer: :class:`longvid.core.window_attention.WindowFusedAttnProcessor` (official VideoCrafter
  FreeNoise, notes §2.2);
* per transformer block: :func:`longvid.core.block_fusion.apply_block_fusion` (official AnimateDiff port and
  diffusers' ``FreeNoiseTransformerBlock``, notes §2.5–2.6);
* per denoiser call: :func:`longvid.core.context_windows.windowed_denoiser` (DiTs).

Deviations from upstream, all deliberate (notes §2.2, §2.6): a tail view ``(F-window, F)`` covers the frames
the regular views miss (official: those frames get 0), it contributes only to those frames with the correct
weight slice ``w[-k:]`` (diffusers: one scalar ``w[-k]``, which mis-scales 2- and 3-frame tails), and
``F ≤ window`` is exactly vanilla (official: zeros below the window; diffusers: IndexError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

WEIGHTINGS = ("pyramid", "flat", "delayed_reverse_sawtooth")

View = tuple[int, int]


# ----------------------------------------------------------------------------------------------------------
# Views and weights
# ----------------------------------------------------------------------------------------------------------


def context_views(num_frames: int, window: int, stride: int) -> list[View]:
    """Half-open frame ranges ``[(s, s+window), …]`` for ``s = 0, stride, …``, plus a tail view if needed.

    The tail view ``(F-window, F)`` is appended when the last regular view stops short of ``F``, so every
    frame is covered. ``F ≤ window`` gives the single view ``[(0, F)]``.
    """
    check_window(window, stride, num_frames)
    if num_frames <= window:
        return [(0, num_frames)]
    views = [(s, s + window) for s in range(0, num_frames - window + 1, stride)]
    if views[-1][1] < num_frames:
        views.append((num_frames - window, num_frames))
    return views


def window_weights(length: int, scheme: str = "pyramid") -> torch.Tensor:
    """Per-position weights of one view, float64 ``(length,)``.

    * ``pyramid`` (official FreeNoise): ``[1, 2, …, n/2, n/2, …, 2, 1]``; odd ``n`` peaks once:
      ``[1, …, m, m+1, m, …, 1]`` with ``n = 2m+1``.
    * ``flat``: all ones.
    * ``delayed_reverse_sawtooth`` (diffusers): even ``n = 2m``: ``[0.01]*(m-1) + [m] + [m, m-1, …, 1]``
      (n=4 → ``[0.01, 2, 2, 1]``). Odd ``n = 2m+1`` (our definition; diffusers returns ``n+1`` weights there):
      ``[0.01]*m + [m+1, m, …, 1]`` (n=5 → ``[0.01, 0.01, 3, 2, 1]``, the list diffusers' own comment gives),
      i.e. near-zero weight on the first half and a descending ramp over the second half.
    """
    if length < 1:
        raise ValueError(f"window weights need a length ≥ 1, got {length}")
    half, odd = divmod(length, 2)
    if scheme == "flat":
        weights = [1.0] * length
    elif scheme == "pyramid":
        rise = list(range(1, half + 1))
        weights = rise + [half + 1] * odd + rise[::-1]
    elif scheme == "delayed_reverse_sawtooth":
        if odd:  # n = 2m+1: [0.01]*m + [m+1, …, 1]
            weights = [0.01] * half + list(range(half + 1, 0, -1))
        else:  # n = 2m: [0.01]*(m-1) + [m] + [m, …, 1]
            weights = [0.01] * (half - 1) + [half] + list(range(half, 0, -1))
    else:
        raise ValueError(f"unknown weighting {scheme!r}; choose one of {', '.join(WEIGHTINGS)}")
    assert len(weights) == length
    return torch.tensor(weights, dtype=torch.float64)


@dataclass(frozen=True)
class FusionPlan:
    """Views of one frame count and the weight each view's frames get in the per-frame average.

    Attributes:
        views: the :func:`context_views`.
        weights: per view, float64 ``(view_len,)``: the raw window weights, zeroed where a tail view overlaps
            frames that earlier views already cover (the tail only fills the uncovered frames).
        counts: float64 ``(F,)``: per-frame sum of ``weights`` (never 0: every frame is covered).
        normalized: per view, ``weights / counts[view]``; summing ``normalized · out`` is the weighted average,
            and keeps the accumulator at the magnitude of the outputs (safe in fp16).
    """

    views: tuple[View, ...]
    weights: tuple[torch.Tensor, ...]
    counts: torch.Tensor
    normalized: tuple[torch.Tensor, ...]
    _cast: dict = field(default_factory=dict, repr=False, compare=False)

    def normalized_as(self, index: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``normalized[index]`` on ``device``/``dtype``, cached so a denoising loop copies it to the GPU once."""
        key = (index, device, dtype)
        if key not in self._cast:
            self._cast[key] = self.normalized[index].to(device=device, dtype=dtype)
        return self._cast[key]


@lru_cache(maxsize=64)
def fusion_plan(num_frames: int, window: int, stride: int, scheme: str = "pyramid") -> FusionPlan:
    """Views, per-view weights and per-frame weight sums for ``num_frames`` frames (cached; do not mutate)."""
    views = context_views(num_frames, window, stride)
    base = window_weights(min(window, num_frames), scheme)  # (L,)
    weights = [base.clone() for _ in views]
    if len(views) > 1 and views[-1][0] % stride != 0:  # a tail view: it only fills the k uncovered frames
        uncovered = num_frames - views[-2][1]  # k
        weights[-1][: window - uncovered] = 0.0  # keeps w[-k:] on the last k frames
    counts = torch.zeros(num_frames, dtype=torch.float64)  # (F,)
    for w, (start, end) in zip(weights, views):
        counts[start:end] += w
    normalized = tuple(w / counts[s:e] for w, (s, e) in zip(weights, views))
    return FusionPlan(tuple(views), tuple(weights), counts, normalized)


def frame_weight_counts(num_frames: int, window: int, stride: int, scheme: str = "pyramid") -> torch.Tensor:
    """Per-frame sum of window weights, float64 ``(F,)`` (pyramid 16/4: 1, 2, 3, 4, 6, 8, …, 18 inside)."""
    return fusion_plan(num_frames, window, stride, scheme).counts.clone()


# ----------------------------------------------------------------------------------------------------------
# Fusion
# ----------------------------------------------------------------------------------------------------------


class WindowAccumulator:
    """Running weighted average of per-view outputs along one frame dimension.

    Views can be added one at a time (so a loop over views never holds more than one view's output) and in
    any order; :meth:`result` is the per-frame weighted average once every view was added.
    """

    def __init__(self, plan: FusionPlan, like: torch.Tensor, dim: int = 1):
        self.plan = plan
        self.dim = dim % like.ndim
        shape = list(like.shape)
        shape[self.dim] = int(plan.counts.numel())
        self.total = like.new_zeros(shape)  # (…, F, …)

    def add(self, index: int, out: torch.Tensor) -> None:
        """Add view ``index``'s output, ``out`` having the view's frames along ``dim``."""
        start, end = self.plan.views[index]
        w = self.plan.normalized_as(index, out.device, out.dtype)  # (L,)
        w = w.view([-1 if d == self.dim else 1 for d in range(out.ndim)])  # broadcast along the frame dim
        self.total.narrow(self.dim, start, end - start).addcmul_(out, w)  # one pass, no temporary

    def result(self) -> torch.Tensor:
        return self.total


def fuse(view_outputs: list[torch.Tensor], plan: FusionPlan, dim: int = 1) -> torch.Tensor:
    """Weighted per-frame average of ``view_outputs`` (one per ``plan.views``, frames along ``dim``)."""
    if len(view_outputs) != len(plan.views):
        raise ValueError(f"fuse: got {len(view_outputs)} view outputs for {len(plan.views)} views")
    acc = WindowAccumulator(plan, view_outputs[0], dim)
    for i, out in enumerate(view_outputs):
        acc.add(i, out)
    return acc.result()


def check_window(window: int, stride: int, num_frames: int = 1) -> None:
    """``ValueError`` unless ``window >= 1``, ``1 <= stride <= window`` and ``num_frames >= 1``."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be ≥ 1, got {num_frames}")
    if window < 1:
        raise ValueError(f"window must be ≥ 1 frame, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and window ({window}), got {stride}")
