"""FreeSwim's dual path on a DiT: a window branch and a full branch, the cross-attention override, its cache.

Per denoiser call, :class:`SwimState` decides what runs (``call``):

- ``dual``: the latents go through the model twice along the batch axis, ``[window, full]``. Self-attention is
  the inward window (``core/swin_attention.py``) on the first half and full attention on the second, both with
  FreeSwim's scale; every cross-attention is computed from the full branch's queries only and its output
  replaces the window branch's (the *override*); only the window half of the prediction is returned, so the full
  branch restarts from the window branch's latents at every step (the official batch layout, notes §2.3).
- ``store`` (cache mode, a guide step of the cond pass): ``dual``, and each block's cross-attention output is
  kept (after ``to_out``: the same values the official code keeps before it, one projection less on reuse).
- ``reuse`` (cache mode, the cond pass between guide steps): the window branch alone, batch 1 — the official
  code still carries the full branch's batch here — with each block's cross-attention taken from the cache.
- ``window`` (cache mode, the uncond pass): the window branch alone with its own cross-attention.

The pieces are a denoiser hook (batch doubling and slicing), an attention op for the self-attention sites and a
processor wrapping each cross-attention site's own processor, all installed and removed by ``methods/freeswim.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from longvid.core.swin_attention import swin_attention
from longvid.core.swin_geometry import attention_scale, window_half

#: Model inputs with one row per batch element: doubled for the two branches.
BATCHED_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")


class SwimState:
    """What the current denoiser call runs, and the per-block cross-attention cache of one stage."""

    def __init__(self, ctx: Any, mode: str, cache_steps: int, cache_device: str):
        self.ctx = ctx
        self.mode = mode
        self.cache_steps = cache_steps
        self.cache_device = cache_device
        self.call = "window"
        self.cache: dict[str, torch.Tensor] = {}  # site name -> (B, S, C) cross-attention output
        self.cached_for: set[str] = set()  # denoisers with a complete cache
        self.capture = False  # keep the full branch's prediction in `captured` (dual_forward)
        self.captured: torch.Tensor | None = None

    def begin(self, denoiser: str) -> str:
        """Set and return :attr:`call` for a call of ``denoiser`` at ``ctx.step`` in branch ``ctx.cfg_branch``."""
        branch = self.ctx.cfg_branch
        if branch == "both":
            raise RuntimeError("FreeSwim needs cond and uncond as separate denoiser calls")
        if self.mode == "nocache":
            self.call = "dual"
        elif branch == "uncond":
            self.call = "window"
        else:
            # guide steps count from the stage's first step (the official range(0, steps, cache_steps)); a
            # denoiser without a cache yet (Wan 2.2's second expert right after the switch) guides first
            guide = (self.ctx.step - self.ctx.start_step) % self.cache_steps == 0
            self.call = "store" if guide or denoiser not in self.cached_for else "reuse"
            if self.call == "store":
                self.cached_for.add(denoiser)
        return self.call

    def keep(self, site: str, out: torch.Tensor) -> None:
        target = out.device if self.cache_device == "device" else torch.device(self.cache_device)
        self.cache[site] = out if target == out.device else out.to(target, non_blocking=False)


def branches_forward(state: SwimState, denoiser: str):
    """A ``replace_forward`` function for a denoiser: doubles the batch on dual calls and returns the window half."""

    def forward(module, original, *args, **kwargs):
        if state.begin(denoiser) not in ("dual", "store"):
            return original(*args, **kwargs)
        if args:  # hidden_states given positionally
            kwargs = {"hidden_states": args[0], **kwargs}
            args = ()
        batch = kwargs["hidden_states"].shape[0]
        doubled = {k: (torch.cat([v, v]) if k in BATCHED_INPUTS and isinstance(v, torch.Tensor) else v)
                   for k, v in kwargs.items()}
        out = original(**doubled)
        if state.capture:
            state.captured = (out[0] if isinstance(out, tuple) else out.sample)[batch:]
        return window_half_of(out, batch)

    return forward


def window_half_of(out: Any, batch: int) -> Any:
    """The window branch's rows of a model output (a tuple or a ``*Output`` with ``sample``)."""
    if isinstance(out, tuple):
        return (out[0][:batch], *out[1:])
    out.sample = out.sample[:batch]
    return out


class SwimSelfOp:
    """The self-attention core: window attention on the window rows, full attention on the full rows."""

    def __init__(self, state: SwimState, base_size: tuple[int, int], stage_size: tuple[int, int], scale_rule: str,
                 inward: bool, backend: str, order: str):
        self.state = state
        self.base_size, self.stage_size = base_size, stage_size
        self.scale_rule, self.inward, self.backend, self.order = scale_rule, inward, backend, order
        self._cache: dict = {}

    def geometry(self, layout) -> tuple[tuple[int, int, int], tuple[int, int], tuple[int, int]]:
        """``(grid, half, base tokens)`` of a call: the base size in tokens of this stage's token pitch."""
        grid = (layout.frames, layout.height, layout.width)
        base = (round(self.base_size[0] * layout.height / self.stage_size[0]),
                round(self.base_size[1] * layout.width / self.stage_size[1]))
        return grid, window_half(base), base

    def __call__(self, q, k, v, layout):  # q/k/v: (B', g, S, D), B' = 2B on dual calls
        grid, half, base = self.geometry(layout)
        scale = attention_scale(q.shape[-1], self.scale_rule, base[0] * base[1], grid[1] * grid[2])

        def window(qw, kw, vw):
            return swin_attention(qw, kw, vw, grid, half, scale, self.inward, self.backend, order=self.order,
                                  cache=self._cache)

        if self.state.call not in ("dual", "store"):
            return window(q, k, v)
        b = q.shape[0] // 2
        full = F.scaled_dot_product_attention(q[b:], k[b:], v[b:], scale=scale)  # (B, g, S, D)
        return torch.cat([window(q[:b], k[:b], v[:b]), full])


class SwimCrossProcessor:
    """Wraps a cross-attention site's own processor: the override on dual calls, the cache on reuse calls."""

    def __init__(self, site, previous, state: SwimState, override: bool):
        self.site, self.previous, self.state, self.override = site, previous, state, override
        for attr in ("_attention_backend", "_parallel_config"):
            setattr(self, attr, getattr(previous, attr, None))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        call = self.state.call
        if call == "reuse":
            cached = self.state.cache[self.site.name]  # (B, S, C), after to_out
            cached = cached.to(hidden_states.device, hidden_states.dtype)
            repeat = hidden_states.shape[0] // cached.shape[0]  # 1; 2 when a caller carries both branches
            return cached if repeat == 1 else cached.repeat(repeat, 1, 1)
        if call not in ("dual", "store") or not self.override:
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        b = hidden_states.shape[0] // 2
        context = encoder_hidden_states[b:] if encoder_hidden_states is not None else None
        mask = attention_mask[b:] if attention_mask is not None and attention_mask.shape[0] == 2 * b else attention_mask
        full = self.previous(attn, hidden_states[b:], context, mask, rotary_emb, **kwargs)  # (B, S, C)
        if call == "store":
            self.state.keep(self.site.name, full)
        return torch.cat([full, full])  # the full branch's cross-attention replaces the window branch's


def cache_bytes(adapter, grid: tuple[int, int, int]) -> int:
    """Bytes of one stage's cache: a ``(1, tokens, width)`` output per cross-attention site, in the model dtype."""
    tokens = grid[0] * grid[1] * grid[2]
    sites = adapter.attention_sites("cross")
    return sum(tokens * int(s.module.inner_dim) for s in sites) * torch.finfo(adapter.dtype).bits // 8


def free_bytes(device) -> int | None:
    """Free memory of a CUDA device, or the machine's available memory for the CPU (None when unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dual_forward(model: torch.nn.Module, state: SwimState, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches' predictions of one call of a FreeSwim-patched ``model`` that runs dual (tests, pictures):
    the hook returns the window half as always and hands the full half over through the state."""
    state.capture = True
    try:
        window = model(**inputs, return_dict=False)[0]
        full = state.captured
    finally:
        state.capture, state.captured = False, None
    if full is None:
        raise RuntimeError("the call did not run both branches (a window-only call: uncond or a reuse step)")
    return window, full
