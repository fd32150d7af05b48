"""Pyramid Flow's block-causal attention without the dense mask: only the blocks the mask keeps are computed.

The sequence is ``[text; vision]`` with the vision tokens in time order, and the official mask (notes §2.2,
:func:`sequence.attention_mask`) lets token i see token j when ``valid_i == valid_j`` and ``τ_i ≥ τ_j``. So:

* text and frame 0 (τ = 0) see text and frame 0, with padded text isolated: one small attention over that
  prefix with its own dense mask (``(L_t + n_0)²``, the only place padding matters among queries);
* the tokens of frame τ ≥ 1 see the real text and frames 0…τ: the keys are a **prefix** of the sequence, so
  every frame is one attention over a slice of k/v, with at most a key-padding mask ``(B, 1, 1, K)`` for the
  padded text (none when no text is padded).

That is exactly the dense masked attention (same scores, same softmax per query over the same keys) without the
``B·L²`` mask or the masked-out work: at 768p the mask keeps about half of the L² entries (docs/benchmarks.md).
Every call is ``scaled_dot_product_attention``, so each device keeps its fused kernels (the CPU flash kernel, the
GPU memory-efficient one where a key-padding mask remains).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longvid.models.pyramid_flow.sequence import PATCH


@dataclass(frozen=True)
class BlockCausal:
    """The structure of one stage's mask: the text validity and where each frame's vision tokens end, plus the two
    small masks the kernel needs, built once per forward (not per attention call)."""

    text_valid: torch.Tensor  # (B, L_t) bool, True = a real (not padded) text token
    ends: tuple[int, ...]  # end (exclusive) of frame τ's vision tokens, counted from the first vision token
    first_mask: torch.Tensor | None = None  # (B, 1, L0, L0) over text + frame 0; None when no text is padded
    key_mask: torch.Tensor | None = None  # (B, 1, 1, L): padded text masked out as keys; None when none is padded

    @property
    def text(self) -> int:
        return self.text_valid.shape[1]

    def dense(self) -> torch.Tensor:
        """The official boolean mask ``(B, 1, L, L)`` this layout stands for (the reference)."""
        b, n = self.text_valid.shape[0], self.ends[-1]
        starts = (0,) + self.ends[:-1]
        tau = torch.cat([torch.zeros(self.text, dtype=torch.int64)] +
                        [torch.full((e - s,), t, dtype=torch.int64) for t, (s, e) in enumerate(zip(starts, self.ends))])
        valid = torch.cat([self.text_valid, torch.ones(b, n, dtype=torch.bool, device=self.text_valid.device)], 1)
        same = valid[:, :, None] == valid[:, None, :]  # (B, L, L)
        return (same & (tau[:, None] >= tau[None, :]).to(same.device))[:, None]


def block_causal(text_mask: torch.Tensor, clips: list[torch.Tensor],
                 device: torch.device | str | None = None) -> BlockCausal:
    """The :class:`BlockCausal` layout of ``[text; clips]`` (clips oldest first, ``(B, C, t, h, w)`` each), its
    masks on ``device`` (None: the text mask's)."""
    ends, total = [], 0
    for clip in clips:
        per_frame = (clip.shape[3] // PATCH) * (clip.shape[4] // PATCH)
        for _ in range(clip.shape[2]):
            total += per_frame
            ends.append(total)
    valid = text_mask.bool().to(device)  # (B, L_t)
    if bool(valid.all()):  # nothing padded: every query sees a plain prefix of the keys
        return BlockCausal(valid, tuple(ends))
    b = valid.shape[0]
    seen = torch.cat([valid, valid.new_ones(b, ends[0])], 1)  # (B, L0): text + frame 0
    keys = torch.cat([valid, valid.new_ones(b, total)], 1)  # (B, L)
    return BlockCausal(valid, tuple(ends), (seen[:, :, None] == seen[:, None, :])[:, None], keys[:, None, None])


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockCausal) -> torch.Tensor:
    """Attention of ``q``/``k``/``v`` ``(B, H, L, d)`` under ``layout``'s mask -> ``(B, H, L, d)`` (any strides)."""
    b, heads, length, dim = q.shape
    text = layout.text
    out = q.new_empty(b, length, heads, dim).transpose(1, 2)  # (B, H, L, d) view of (B, L, H, d): free to flatten
    # text and frame 0: a dense mask over their own prefix (padded text sees padded text only)
    first = text + layout.ends[0]
    out[:, :, :first] = F.scaled_dot_product_attention(q[:, :, :first], k[:, :, :first], v[:, :, :first],
                                                       attn_mask=layout.first_mask)
    # frame τ ≥ 1: real text + frames 0…τ, a prefix of the keys
    keys = layout.key_mask
    for start, end in zip(layout.ends[:-1], layout.ends[1:]):
        rows, stop = slice(text + start, text + end), text + end
        out[:, :, rows] = F.scaled_dot_product_attention(
            q[:, :, rows], k[:, :, :stop], v[:, :, :stop], attn_mask=None if keys is None else keys[..., :stop])
    return out
