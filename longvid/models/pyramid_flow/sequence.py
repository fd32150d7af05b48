"""One stage's token sequence for Pyramid Flow's DiT: patches, positions and the block-causal mask (notes §2.2).

Every clip (history clips, then the current unit) is cut into 2×2 patches flattened in ``(p1 p2 c)`` order —
not diffusers' Flux packing ``(c p1 p2)`` — and the clips are concatenated in time order. Each latent frame gets
a temporal index τ (0 for the oldest, the last for the current unit; text tokens have τ = 0). miniFLUX rotates
with (τ, y, x) positions where a lower-resolution clip's rows and columns sit at *interpolated* positions of the
current clip's grid (½ resolution: 0.5, 2.5, …). The mask lets token i see token j when both are real or both
are padding (padded text only sees padded text) and ``τ_i ≥ τ_j``: block-causal in time, full within a frame,
text seeing only text and frame 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH = 2


def pack(clip: torch.Tensor) -> torch.Tensor:
    """Tokens ``(B, t·h/2·w/2, 4C)`` of a clip ``(B, C, t, h, w)``: 2×2 patches in (t, row, col) order, each
    flattened ``(p1 p2 c)``."""
    b, c, t, h, w = clip.shape
    x = clip.reshape(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(b, t * (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def unpack(tokens: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The clip ``(B, C, t, h, w)`` of ``shape`` from its tokens ``(B, t·h/2·w/2, 4C)`` (inverse of :func:`pack`)."""
    b, c, t, h, w = shape
    x = tokens.reshape(b, t, h // PATCH, w // PATCH, PATCH, PATCH, c)
    return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, c, t, h, w)


def frame_index(clips: list[torch.Tensor]) -> torch.Tensor:
    """τ of every vision token, ``(N,)`` int64: frames numbered across the clips, oldest first."""
    taus, start = [], 0
    for clip in clips:
        t, h, w = clip.shape[2], clip.shape[3] // PATCH, clip.shape[4] // PATCH
        taus.append((start + torch.arange(t)).repeat_interleave(h * w))
        start += t
    return torch.cat(taus)


def image_ids(clips: list[torch.Tensor]) -> torch.Tensor:
    """miniFLUX's (τ, y, x) positions of every vision token, ``(N, 3)`` float: rows and columns of a clip at the
    linear interpolation (align_corners False) of the current (last) clip's token grid."""
    rows, cols = clips[-1].shape[3] // PATCH, clips[-1].shape[4] // PATCH
    ids, start = [], 0
    for clip in clips:
        t, h, w = clip.shape[2], clip.shape[3] // PATCH, clip.shape[4] // PATCH
        y = F.interpolate(torch.arange(rows, dtype=torch.float32)[None, None], size=h, mode="linear",
                          align_corners=False)[0, 0]  # (h,)
        x = F.interpolate(torch.arange(cols, dtype=torch.float32)[None, None], size=w, mode="linear",
                          align_corners=False)[0, 0]  # (w,)
        grid = torch.stack(torch.meshgrid(start + torch.arange(t, dtype=torch.float32), y, x, indexing="ij"), -1)
        ids.append(grid.reshape(-1, 3))  # (t·h·w, 3)
        start += t
    return torch.cat(ids)


def attention_mask(text_mask: torch.Tensor, clips: list[torch.Tensor]) -> torch.Tensor:
    """Boolean ``(B, 1, L, L)`` mask over ``[text; vision]`` (True = may attend): ``valid_i == valid_j`` and
    ``τ_i ≥ τ_j``, with ``valid`` the text attention mask (1 for vision) and τ = 0 for text."""
    b, length = text_mask.shape
    tau = torch.cat([torch.zeros(length, dtype=torch.int64), frame_index(clips)]).to(text_mask.device)  # (L,)
    n = tau.numel() - length
    valid = torch.cat([text_mask.bool(), torch.ones(b, n, dtype=torch.bool, device=text_mask.device)], 1)  # (B, L)
    same = valid[:, :, None] == valid[:, None, :]  # (B, L, L)
    causal = tau[:, None] >= tau[None, :]  # (L, L)
    return (same & causal)[:, None]


_LAST_MASK: dict = {}


def stage_mask(text_mask: torch.Tensor, clips: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """:func:`attention_mask` on ``device``, built once per stage: every step of a stage sees the same clip shapes
    and text, so the last mask is kept (one entry: at 768p it is ~0.5 GB for the CFG batch)."""
    key = (tuple(tuple(c.shape) for c in clips), tuple(text_mask.shape), text_mask.cpu().numpy().tobytes(),
           str(device))
    if key not in _LAST_MASK:
        _LAST_MASK.clear()
        _LAST_MASK[key] = attention_mask(text_mask, clips).to(device)
    return _LAST_MASK[key]
