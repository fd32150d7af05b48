"""Multi-prompt helpers: per-frame prompt embeddings from keyframes, and one prompt per context window.

A multi-prompt recipe gives ``{frame: prompt}`` keyframes. UNets with per-frame cross-attention (AnimateDiff)
take one embedding per frame, linearly interpolated between keyframes (:func:`interpolate_keyframes`, the
same values diffusers' FreeNoise multi-prompt produces). DiTs take one text condition per forward, so each
context window gets the keyframe prompt that covers most of its frames (:func:`assign_windows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def interpolate_keyframes(keyframes: Mapping[int, torch.Tensor], num_frames: int) -> torch.Tensor:
    """Per-frame embeddings ``(num_frames, *emb_shape)`` from keyframe embeddings ``{frame: (*emb_shape)}``.

    Between consecutive keyframes ``a`` (frame ``i``) and ``b`` (frame ``j``), frame ``t ∈ [i, j]`` gets
    ``(1-α)·a + α·b`` with ``α = (t-i)/(j-i)`` (both ends inclusive); the last keyframe is held to the end.
    The arithmetic is the one diffusers 0.42.1 uses (``AnimateDiffFreeNoiseMixin._encode_prompt_free_noise``
    with ``_lerp``: python-float ``α``, the hold segment computed as a lerp of the last keyframe with itself),
    so the result is bit-identical to diffusers; the held frames equal the keyframe to within 1 ulp.
    Unlike diffusers, ``num_frames=1`` returns the keyframe (diffusers returns zeros there).
    """
    keys = _check_keys(keyframes, num_frames)
    embeds = [keyframes[k] for k in keys]
    shapes = {tuple(e.shape) for e in embeds}
    if len(shapes) != 1:
        raise ValueError(f"keyframe embeddings must all have one shape, got {sorted(shapes)}")
    if keys[-1] != num_frames - 1:  # hold the last prompt: one more segment, last keyframe → itself
        keys, embeds = keys + [num_frames - 1], embeds + [embeds[-1]]
    out = embeds[0].new_zeros((num_frames, *embeds[0].shape))  # (F, *emb_shape)
    out[0] = embeds[0]
    for i, j, a, b in zip(keys, keys[1:], embeds, embeds[1:]):
        out[i : j + 1] = _lerp_segment(a, b, j - i + 1)
    return out


def _lerp_segment(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """``n ≥ 2`` frames from ``a`` to ``b``, ends included. ``(*emb) -> (n, *emb)``."""
    return torch.stack([(1 - t / (n - 1)) * a + (t / (n - 1)) * b for t in range(n)])


def assign_windows(keyframes: Mapping[int, Any], views: Sequence[tuple[int, int]]) -> list[int]:
    """For each view ``(start, end)``, the keyframe whose span covers most of the view's frames.

    Keyframe ``k_i`` spans frames ``[k_i, k_{i+1})``; the last one spans to the end. Ties go to the earlier
    keyframe, so the assignment is deterministic. Returns the keyframe *keys* (frame indices), one per view.
    """
    keys = _check_keys(keyframes, None)
    result = []
    for start, end in views:
        if not 0 <= start < end:
            raise ValueError(f"views must be (start, end) with 0 ≤ start < end, got {(start, end)}")
        ends = keys[1:] + [max(end, keys[-1]) + 1]
        overlap = [max(0, min(end, e) - max(start, k)) for k, e in zip(keys, ends)]
        result.append(keys[overlap.index(max(overlap))])
    return result


def _check_keys(keyframes: Mapping[int, Any], num_frames: int | None) -> list[int]:
    """Sorted keyframe indices, after checking they are ints, start at 0 and lie inside the clip."""
    if not keyframes:
        raise ValueError("keyframes is empty: give at least {0: prompt}")
    bad = [k for k in keyframes if isinstance(k, bool) or not isinstance(k, int)]
    if bad:
        raise ValueError(f"keyframe keys must be integer frame indices, got {bad!r}")
    keys = sorted(keyframes)
    if keys[0] != 0:
        raise ValueError(f"the first keyframe must be frame 0 (a prompt for the start), got {keys[0]}")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be ≥ 1, got {num_frames}")
        if keys[-1] >= num_frames:
            raise ValueError(f"keyframe {keys[-1]} is outside the clip: frames are 0..{num_frames - 1}")
    return keys
