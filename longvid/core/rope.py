"""The RoPE seam: per-axis frequency edits and position remaps on a model's rotary-position module.

A rotary module turns integer positions ``p`` on each axis (frame, row, column) into angles ``p·θ_j`` with
``θ_j = base^(-2j/d)`` and hands ``cos``/``sin`` tables to every attention layer. The length-extrapolation
methods change exactly that, on the temporal axis: RIFLEx lowers one frequency, NTK raises the base, PI
divides the positions, YaRN interpolates some frequencies and keeps the others. An :class:`AxisEdit` states
such a change as two pure functions (frequencies -> frequencies, positions -> positions); :func:`apply_rope_edits`
installs it on a module as a named, removable diffusers hook that computes the edited axis tables in float64
and casts them to float32, exactly as diffusers builds the stock tables, so an identity edit is bit-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from longvid.core.hooks import replace_forward

Tensor = torch.Tensor


@dataclass(frozen=True)
class AxisEdit:
    """How one axis's rotary angles change: ``frequencies(inv_freq)`` and ``positions(p)``, both float64."""

    frequencies: Callable[[Tensor], Tensor] | None = None
    positions: Callable[[Tensor], Tensor] | None = None


def inverse_frequencies(dim: int, base: float = 10000.0) -> Tensor:
    """``θ_j = 1 / base^(2j/dim)``, j = 0..dim/2-1, float64 (diffusers ``get_1d_rotary_pos_embed``'s order)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))


def axis_table(dim: int, length: int, base: float = 10000.0, edit: AxisEdit | None = None,
               device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of positions ``0..length-1`` on one axis, float32 ``(length, dim)``, pairs interleaved.

    Mirrors diffusers 0.42.1 ``get_1d_rotary_pos_embed(use_real=True, repeat_interleave_real=True,
    freqs_dtype=float64)``: angles in float64, then cos/sin, interleave, cast; with ``edit`` applied to the
    frequencies and positions first.
    """
    inv = inverse_frequencies(dim, base)  # (dim/2,)
    pos = torch.arange(length, dtype=torch.float64)  # (length,)
    if edit is not None and edit.frequencies is not None:
        inv = edit.frequencies(inv)
    if edit is not None and edit.positions is not None:
        pos = edit.positions(pos)
    angles = torch.outer(pos, inv)  # (length, dim/2)
    cos = angles.cos().repeat_interleave(2, dim=1).float()
    sin = angles.sin().repeat_interleave(2, dim=1).float()
    return cos.to(device), sin.to(device)


# -------------------------------------------------------------------------------------------- the edits


def riflex(k: int, test_frames: int, factor: float = 0.9) -> AxisEdit:
    """RIFLEx: frequency ``k`` (1-based) becomes ``factor·2π/test_frames`` (before the outer product)."""

    def frequencies(inv: Tensor) -> Tensor:
        inv = inv.clone()
        inv[k - 1] = factor * 2 * math.pi / test_frames
        return inv

    return AxisEdit(frequencies=frequencies)


def intrinsic_frequency(dim: int, repeat_frames: int, base: float = 10000.0) -> tuple[int, int]:
    """RIFLEx's ``identify_k``: the 1-based index k whose period ``round(2π/θ_k)`` is closest to the frame where
    repetition shows up, and that period N_k."""
    periods = [round(2 * math.pi / float(t)) for t in inverse_frequencies(dim, base)]
    k = min(range(len(periods)), key=lambda i: abs(periods[i] - repeat_frames)) + 1
    return k, periods[k - 1]


def ntk(scale: float, dim: int) -> AxisEdit:
    """NTK-aware scaling: base' = base·scale^(d/(d-2)), i.e. every frequency times scale^(-2j/(d-2))."""
    exponent = dim / (dim - 2)

    def frequencies(inv: Tensor) -> Tensor:
        j = torch.arange(inv.numel(), dtype=torch.float64)
        return inv * (scale ** exponent) ** (-2 * j / dim)

    return AxisEdit(frequencies=frequencies)


def position_interpolation(scale: float) -> AxisEdit:
    """PI: positions divided by ``scale`` (the test length over the training length)."""
    return AxisEdit(positions=lambda pos: pos / scale)


def yarn(scale: float, train_frames: int, low: float = 0.6, high: float = 1.0) -> AxisEdit:
    """YaRN's NTK-by-parts on one axis: a frequency that turns ``r = train_frames·θ/2π`` times over the training
    length keeps its value when ``r >= high`` (it has seen full periods: extrapolate), is divided by ``scale``
    when ``r <= low`` (interpolate), and is ramped linearly in between. FreeLOC's baseline uses high = 1,
    low = 0.6 in training frames (no attention temperature)."""

    def frequencies(inv: Tensor) -> Tensor:
        turns = train_frames * inv / (2 * math.pi)
        keep = ((turns - low) / (high - low)).clamp(0.0, 1.0)  # 1: extrapolate, 0: interpolate
        return keep * inv + (1 - keep) * inv / scale

    return AxisEdit(frequencies=frequencies)


# ------------------------------------------------------------------------------------ installing on Wan


def wan_axes(module: torch.nn.Module) -> dict[str, int]:
    """The ``{axis: dim}`` split of a diffusers ``WanRotaryPosEmbed`` (t, h, w)."""
    return {"t": module.t_dim, "h": module.h_dim, "w": module.w_dim}


def check_stock_tables(module: torch.nn.Module, base: float = 10000.0) -> bool:
    """Whether ``module``'s buffers are the stock tables :func:`axis_table` rebuilds (so edits start from them)."""
    start = 0
    for dim in wan_axes(module).values():
        cos, sin = axis_table(dim, module.max_seq_len, base, device=module.freqs_cos.device)
        stop = start + dim
        if not (torch.equal(module.freqs_cos[:, start:stop], cos.to(module.freqs_cos.dtype))
                and torch.equal(module.freqs_sin[:, start:stop], sin.to(module.freqs_sin.dtype))):
            return False
        start = stop
    return True


def apply_rope_edits(module: torch.nn.Module, edits: dict[str, AxisEdit], name: str,
                     base: float = 10000.0) -> Callable[[], None]:
    """Install ``edits`` (``{"t": AxisEdit, ...}``) on a ``WanRotaryPosEmbed`` as the named hook ``name``;
    returns the undo. The hook computes what ``WanRotaryPosEmbed.forward`` (diffusers 0.42.1, pinned in
    tests/models/test_upstream.py) computes, with the edited axes' tables, which are built once per length."""
    axes = wan_axes(module)
    tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def table(axis: str, length: int, device) -> tuple[Tensor, Tensor]:
        key = (axis, length, str(device))
        if key not in tables:
            if axis in edits:
                tables[key] = axis_table(axes[axis], length, base, edits[axis], device)
            else:
                start = sum(d for a, d in axes.items() if list(axes).index(a) < list(axes).index(axis))
                tables[key] = (module.freqs_cos[:length, start:start + axes[axis]],
                               module.freqs_sin[:length, start:start + axes[axis]])
        return tables[key]

    def forward(mod, original, hidden_states, *args, **kwargs):
        _, _, frames, height, width = hidden_states.shape  # (B, C, F, H, W)
        p_t, p_h, p_w = mod.patch_size
        sizes = {"t": frames // p_t, "h": height // p_h, "w": width // p_w}
        cos_parts, sin_parts = [], []
        shape = {"t": (-1, 1, 1), "h": (1, -1, 1), "w": (1, 1, -1)}
        for axis in ("t", "h", "w"):
            cos, sin = table(axis, sizes[axis], mod.freqs_cos.device)  # (n, d)
            view = (*shape[axis], cos.shape[-1])
            cos_parts.append(cos.view(view).expand(sizes["t"], sizes["h"], sizes["w"], -1))
            sin_parts.append(sin.view(view).expand(sizes["t"], sizes["h"], sizes["w"], -1))
        tokens = sizes["t"] * sizes["h"] * sizes["w"]
        freqs_cos = torch.cat(cos_parts, dim=-1).reshape(1, tokens, 1, -1)  # (1, S, 1, D)
        freqs_sin = torch.cat(sin_parts, dim=-1).reshape(1, tokens, 1, -1)
        return freqs_cos, freqs_sin

    return replace_forward(module, name, forward)
