"""Pictures of what a recipe's methods will do, without loading the model (``longvid explain RECIPE --out DIR``).

Every figure is drawn from the same pure geometry functions the methods run (``longvid.core``) and from the
torch-free family spec, so it shows exactly what a run would do and costs a second, not a model load. Each
method has a ``<method>_data(recipe, spec) -> dict of numpy arrays`` (what is plotted; the tests check it
against the core functions) and a drawer that turns it into figures named ``<method>-<what>.png``.

Attention maps are drawn per *frame pair* (query frame x key frame): the share of the pair's token pairs a rule
selects, computed on a small token grid of :func:`_tokens_per_frame` tokens per latent frame (the real one has
1560 at 480x832, which would be 10^10 pairs). The rules are token-distance bands in units of frames, so the
frame-level picture is the real one; what a small grid cannot show is noted where it matters (TSA's raster
stripe is narrower than a token below 8 tokens per frame). docs/explain.md says how to read each figure.
"""

from __future__ import annotations

import math
import textwrap
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np

from longvid.errors import Problem, RecipeError
from longvid.registry import model_spec

DPI = 100
WIDTH = 8.0  # inches: 800 px at DPI
#: Upper bound on tokens of the small attention grid (frames x tokens per frame): 2.6 M pairs, ~0.1 s per rule.
MAX_TOKENS = 1600
#: Tokens per frame of the small grid for videos short enough (TSA's stripe: 18 % of pairs here, 23 % at 1560).
GRID_TOKENS = 16
#: Wan's temporal RoPE band: diffusers' WanRotaryPosEmbed gives head dim 128 - 2 * 2 * (128 // 6) = 44 dims to
#: frames (every Wan 2.1 / 2.2 checkpoint has head dim 128); the rotary module itself is not loaded here.
ROPE_TEMPORAL_DIMS = {"wan": 44}

Figures = Iterator[tuple[str, Any]]  # (what, matplotlib Figure)


def explain(recipe, out_dir: Path) -> list[Path]:
    """Write PNG figures of what ``recipe``'s methods do (and of Pyramid Flow's schedule) into ``out_dir``.

    Returns the written paths in drawing order. Loads no weights. A recipe with nothing to explain raises a
    one-line :class:`~longvid.errors.RecipeError`. Existing figures of the same name are replaced atomically.
    """
    spec = model_spec(recipe.model.family)
    drawers: list[tuple[str, Callable[[Any, Any], Figures]]] = []
    if recipe.model.family == "pyramid_flow":
        drawers.append(("pyramid-flow", _draw_pyramid_flow))
    drawers += [(name, DRAWERS[name]) for name, cfg in recipe.methods.items() if cfg is not None and name in DRAWERS]
    if not drawers:
        name = recipe.name or "this recipe"
        raise RecipeError([Problem("recipe", f"'{name}' has no method to explain; add one under methods "
                                             "(`longvid methods` lists them) or pick a recipe that uses one")])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in drawers:
        for what, fig in draw(recipe, spec):
            written.append(_save(fig, out_dir / f"{name}-{what}.png"))
    return written


# ------------------------------------------------------------------------------------------------ shared


def _stage(recipe, method: str):
    """The first stage plan ``method`` runs in: its frame count and size are what the method sees."""
    from longvid.recipe.stages import plan_stages

    plans = plan_stages(recipe)
    return next((p for p in plans if method in p.methods), plans[-1])


def _token_grid(spec, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """``(latent frames, rows, columns)`` of the DiT's tokens (VAE stride x patch size per token; no weights)."""
    pitch = spec.vae_spatial * spec.patch_spatial
    return spec.latent_frames(num_frames), height // pitch, width // pitch


def _tokens_per_frame(frames: int) -> int:
    """Tokens per frame of the small attention grid: :data:`GRID_TOKENS`, fewer for very long videos."""
    return max(1, min(GRID_TOKENS, MAX_TOKENS // frames))


def _pair_share(member: Any, frames: int, p: int) -> np.ndarray:
    """``(S, S)`` token-pair booleans -> ``(F, F)`` share of each (query frame, key frame) block that is set."""
    return member.reshape(frames, p, frames, p).double().mean(dim=(1, 3)).numpy()


def _trained_frames(spec) -> int:
    return spec.latent_frames(spec.native_frames)


def _figure(height: float, title: str):
    # lazily (only explain needs matplotlib); a bare Figure renders with Agg and keeps out of pyplot's global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    lines = [w for line in title.splitlines() for w in textwrap.wrap(line, 90)]  # fits 800 px at 10 pt
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def _branch_maps(fig, grid: tuple[int, int], shares: list[np.ndarray], titles: list[str]) -> None:
    """One query x key share map per branch on a ``grid`` of axes, with one colour bar for all."""
    for ax, share, title in zip(fig.subplots(*grid).flat, shares, titles):
        im = _pair_axes(ax, share, title)
    fig.colorbar(im, ax=list(fig.axes), shrink=0.6, label="share of token pairs")


def _pair_axes(ax, image: np.ndarray, title: str, cmap: str = "viridis"):
    """A query-frame x key-frame map of shares in [0, 1] (query 0 at the top, as a matrix)."""
    im = ax.imshow(image, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key frame (latent)")
    ax.set_ylabel("query frame (latent)")
    return im


def _save(fig, path: Path) -> Path:
    """Render ``fig`` to a hidden temporary file next to ``path``, then move it onto ``path`` (never half a PNG)."""
    from longvid.io.paths import create_exclusive, partial_path, publish, remove_quietly

    tmp = partial_path(path)
    try:
        with open(create_exclusive(tmp), "wb") as fh:
            fig.savefig(fh, format="png", dpi=DPI)
        publish(tmp, path, overwrite=True)
    finally:
        remove_quietly(tmp)
        fig.clear()  # a bare Figure is not in pyplot's registry: clearing frees it at once
    return path


# --------------------------------------------------------------------------------------------- FreeNoise


def freenoise_data(recipe, spec) -> dict[str, np.ndarray]:
    """Each context window's weight per latent frame and the per-frame sum the fusion divides by.

    ``weights`` (V, F): raw window weights (0 outside a window; a tail window only on the frames it fills);
    ``normalized`` (V, F): each window's share of a frame's fused output; ``counts`` (F,): the per-frame sum.
    """
    from longvid.core.windows import frame_weight_counts, fusion_plan
    from longvid.methods.freenoise import FreeNoise

    cfg = recipe.methods["freenoise"]
    frames = spec.latent_frames(_stage(recipe, "freenoise").num_frames)
    window, stride = FreeNoise.geometry(cfg, spec)  # latent frames
    plan = fusion_plan(frames, window, stride, cfg.weighting)  # cached and shared: copied out, never written
    weights = np.zeros((len(plan.views), frames))
    normalized = np.zeros((len(plan.views), frames))
    for i, ((start, end), w, n) in enumerate(zip(plan.views, plan.weights, plan.normalized)):
        weights[i, start:end] = w.numpy()
        normalized[i, start:end] = n.numpy()
    return {"weights": weights, "normalized": normalized,
            "counts": frame_weight_counts(frames, window, stride, cfg.weighting).numpy(),
            "views": np.array(plan.views), "window": np.array(window), "stride": np.array(stride)}


def _draw_freenoise(recipe, spec) -> Figures:
    from longvid.methods.freenoise import FreeNoise

    cfg = recipe.methods["freenoise"]
    d = freenoise_data(recipe, spec)
    fusion = FreeNoise.fusion_for(cfg, spec)
    unit = "latent frames" if spec.temporal_stride > 1 else "frames"
    note = "  (fusion none: the windows only shape the rescheduled noise)" if fusion == "none" else ""
    fig = _figure(6.0, f"freenoise: window {int(d['window'])} / stride {int(d['stride'])} {unit}, {cfg.weighting} "
                       f"weights, fusion {fusion}, {len(d['views'])} windows over {d['counts'].size} {unit}{note}")
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(d["counts"].size)
    colors = _colors(len(d["views"]))
    for i, w in enumerate(d["weights"]):
        shown = np.where(w > 0, w, np.nan)  # a window's curve only where it contributes
        top.plot(x, shown, color=colors[i], lw=1.2, label=f"window {i}: {tuple(int(v) for v in d['views'][i])}")
    top.plot(x, d["counts"], color="black", lw=2, label="sum (the fusion's normaliser)")
    top.set_ylabel("weight")
    top.set_title("each window's weight per frame, and their sum", fontsize=9)
    if len(d["views"]) <= 12:
        top.set_ylim(0, 1.5 * d["counts"].max())  # room for the legend above the curves
        top.legend(fontsize=6, ncol=4, loc="upper center")
    bottom.stackplot(x, d["normalized"], colors=colors, step="mid")
    bottom.set_ylabel("share of the fused frame")
    bottom.set_xlabel(unit[:-1])  # "latent frame" or "frame"
    bottom.set_title("each window's share of the fused output (weight / sum; sums to 1)", fontsize=9)
    bottom.set_ylim(0, 1)
    yield "weights", fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


# ---------------------------------------------------------------------------------------------- FreeLong


def freelong_data(recipe, spec) -> dict[str, np.ndarray]:
    """Slices of the 3D Gaussian low-pass through its peak, and the local branch's key window per query frame.

    ``filter_tw`` (F, W): temporal x width frequencies; ``profile_t`` (F,): temporal frequencies; ``freq_t`` /
    ``freq_w``: each fftshifted bin's frequency as a fraction of Nyquist; ``local`` (F, F): keys of the local
    branch (the global branch sees every frame).
    """
    import torch

    from longvid.core.attention import window_bounds
    from longvid.core.spectral import gaussian_low_pass_filter

    cfg = recipe.methods["freelong"]
    stage = _stage(recipe, "freelong")
    shape = _token_grid(spec, stage.num_frames, stage.height, stage.width)  # (F, H, W) the blend runs over
    lpf = gaussian_low_pass_filter(shape, cfg.d_s, cfg.d_t, cfg.grid, dtype=torch.float64).numpy()
    # slice through the peak (the DC bin; off-centre for odd sizes on the official grid)
    _, h0, w0 = np.unravel_index(int(np.argmax(lpf)), lpf.shape)
    window = spec.latent_frames(cfg.window or spec.native_frames)
    lo, hi = (b.numpy() for b in window_bounds(shape[0], window, cfg.window_mode))
    keys = np.arange(shape[0])
    return {"filter_tw": lpf[:, h0, :], "profile_t": lpf[:, h0, w0],
            "freq_t": _nyquist_fractions(shape[0]), "freq_w": _nyquist_fractions(shape[2]),
            "local": ((keys >= lo[:, None]) & (keys < hi[:, None])).astype(float),
            "shape": np.array(shape), "window": np.array(window)}


def _nyquist_fractions(n: int) -> np.ndarray:
    """Frequency of each fftshifted FFT bin as a fraction of Nyquist (axis labels only)."""
    return np.fft.fftshift(np.fft.fftfreq(n)) * 2


def _draw_freelong(recipe, spec) -> Figures:
    cfg = recipe.methods["freelong"]
    d = freelong_data(recipe, spec)
    f, h, w = (int(v) for v in d["shape"])
    where = f"the {f}x{h}x{w} token grid"
    if "temporal" in spec.attention_kinds:  # UNet: every level blends on its own grid, the same filter resampled
        where = f"the {f}x{h}x{w} latent grid (each UNet level on its own grid" + (
            "; the full-resolution level uses the local branch only)" if cfg.full_resolution == "local" else ")")
    fig = _figure(4.4, f"freelong: Gaussian low-pass d_t={cfg.d_t}, d_s={cfg.d_s} ({cfg.grid} grid) on {where}\n"
                       "P from the global branch, 1 - P from the local one")
    left, right = fig.subplots(1, 2)
    extent = (d["freq_w"][0], d["freq_w"][-1], d["freq_t"][0], d["freq_t"][-1])
    im = left.imshow(d["filter_tw"], cmap="magma", vmin=0, vmax=1, extent=extent, aspect="auto", origin="lower",
                     interpolation="nearest")
    fig.colorbar(im, ax=left, label="P (global share)")
    left.set_xlabel("width frequency (x Nyquist)")
    left.set_ylabel("temporal frequency (x Nyquist)")
    left.set_title("temporal x width slice through the peak", fontsize=9)
    right.plot(d["freq_t"], d["profile_t"], "o-", ms=2, label="P (global)")
    right.plot(d["freq_t"], 1 - d["profile_t"], "o-", ms=2, label="1 - P (local)")
    right.axvline(cfg.d_t, color="grey", ls=":", lw=1)
    right.axvline(-cfg.d_t, color="grey", ls=":", lw=1, label=f"±d_t = {cfg.d_t}")
    right.set_xlabel("temporal frequency (x Nyquist)")
    right.set_ylabel("share")
    right.set_ylim(-0.02, 1.02)
    right.set_title("temporal profile at spatial DC", fontsize=9)
    right.legend(fontsize=7, loc="center right")
    yield "filter", fig

    fig = _figure(5.2, f"freelong: local branch window {int(d['window'])} latent frames ({cfg.window_mode}); the "
                       f"global branch sees all {f}")
    ax = fig.subplots()
    _pair_axes(ax, d["local"], "keys each query frame's local branch attends to", cmap="Blues")
    yield "local-window", fig


# ---------------------------------------------------------------------------------------------- FreeLOC

TSA_NAMES = ("diag (original positions)", "sink-past", "sink-future")
VRPR_NAMES = ("diag (exact)", "mid-past (grouped by G1)", "mid-future", "far-past (grouped by G2)", "far-future")


def freeloc_data(recipe, spec) -> dict[str, np.ndarray]:
    """TSA and VRPR branch membership per frame pair, and VRPR's re-encoded relative position per frame pair.

    ``tsa`` (3, F, F) / ``vrpr`` (5, F, F): share of each frame pair's token pairs in each branch, and
    ``tsa_none`` / ``vrpr_none`` (F, F) in none; ``vrpr_relative`` (F, F): the relative position most of a pair's
    tokens see (:func:`vrpr_relative_table`; past keys only, NaN above the diagonal); ``tokens_per_frame`` and
    ``round_to`` of the small grid (the recipe's rounding scaled to it: a fixed fraction of a frame).
    """
    import torch

    from longvid.core.freeloc_geometry import tsa_member, vrpr_member, vrpr_settings

    cfg = recipe.methods["freeloc"]
    stage = _stage(recipe, "freeloc")
    frames, rows, cols = _token_grid(spec, stage.num_frames, stage.height, stage.width)
    p = _tokens_per_frame(frames)
    round_to = max(1, round(cfg.round_to * p / (rows * cols)))
    tokens = torch.arange(frames * p)
    m, n = tokens[:, None], tokens[None, :]  # (S, 1), (1, S): every (query, key) token pair
    settings = vrpr_settings(frames)
    tsa = [tsa_member(m, n, b, p, frames, round_to, cfg.sink_future) for b in range(3)]
    vrpr = [vrpr_member(m, n, b, p, settings, round_to, cfg.vrpr_gap_fix) for b in range(5)]
    return {"tsa": np.stack([_pair_share(t, frames, p) for t in tsa]),
            "tsa_none": _pair_share(~torch.stack(tsa).any(0), frames, p),
            "vrpr": np.stack([_pair_share(v, frames, p) for v in vrpr]),
            "vrpr_none": _pair_share(~torch.stack(vrpr).any(0), frames, p),
            "vrpr_relative": _vrpr_relative(frames, p, round_to, cfg.vrpr_gap_fix),
            "settings": np.array([settings.w1, settings.w2, settings.g1, settings.g2, settings.clip]),
            "tokens_per_frame": np.array(p), "round_to": np.array(round_to)}


@lru_cache(maxsize=8)
def _vrpr_relative_cached(frames: int, p: int, round_to: int, gap_fix: bool) -> np.ndarray:
    from longvid.core.freeloc_geometry import vrpr_relative_table

    rel = np.full((frames, frames), np.nan)  # (query frame, key frame)
    for q in range(frames):  # ~1 s at 81 frames: the table's own loop, reused as is
        for d, position, _ in vrpr_relative_table(frames, q, p, round_to, gap_fix):
            rel[q, q - d] = np.nan if position is None else position
    rel.setflags(write=False)
    return rel


def _vrpr_relative(frames: int, p: int, round_to: int, gap_fix: bool) -> np.ndarray:
    return _vrpr_relative_cached(frames, p, round_to, gap_fix).copy()


def _freeloc_note(recipe, spec, frames: int) -> str:
    cfg = recipe.methods["freeloc"]
    if cfg.gate and frames <= _trained_frames(spec):
        return f"inactive: {frames} latent frames are within the trained {_trained_frames(spec)} (gate)"
    if cfg.tsa_layers is not None:
        return f"TSA on layers {list(cfg.tsa_layers)}, VRPR on the others"
    if cfg.preset is not None:
        return f"TSA/VRPR layers from the preset {cfg.preset}"
    return "layers: the model's built-in preset (Wan 2.1 1.3B: TSA on 17 of 30, VRPR on the rest)"


def _draw_freeloc(recipe, spec) -> Figures:
    cfg = recipe.methods["freeloc"]
    d = freeloc_data(recipe, spec)
    frames = d["tsa_none"].shape[0]
    p, round_to = int(d["tokens_per_frame"]), int(d["round_to"])
    rounding = f"bands rounded up to {round_to}-token multiples" if round_to > 1 else "exact frame bands"
    grid = f"{frames} latent frames, {p} tokens/frame ({rounding})"
    note = _freeloc_note(recipe, spec, frames)

    fig = _figure(7.6, f"freeloc TSA (sink_future={cfg.sink_future}): share of each frame pair's token pairs "
                       f"per branch\n{grid}\n{note}")
    _branch_maps(fig, (2, 2), [*d["tsa"], d["tsa_none"]], [*TSA_NAMES, "none (not attended)"])
    yield "tsa", fig

    w1, w2, g1, g2, clip = (int(v) for v in d["settings"])
    fig = _figure(6.4, f"freeloc VRPR (W1={w1}, W2={w2}, G1={g1}, G2={g2}, clip {clip}, gap_fix={cfg.vrpr_gap_fix}): "
                       f"share of each frame pair's token pairs per branch\n{grid}\n{note}")
    _branch_maps(fig, (2, 3), [*d["vrpr"], d["vrpr_none"]], [*VRPR_NAMES, "none (the gap)"])
    yield "vrpr", fig

    rel = d["vrpr_relative"]
    fig = _figure(4.4, f"freeloc VRPR re-encoded relative positions (query - key, past keys), clip {clip}\n{grid}")
    left, right = fig.subplots(1, 2)
    im = left.imshow(rel, cmap="viridis", interpolation="nearest", aspect="equal")
    fig.colorbar(im, ax=left, label="relative position seen")
    left.set_xlabel("key frame (latent)")
    left.set_ylabel("query frame (latent)")
    left.set_title("most tokens' relative position", fontsize=9)
    last = rel[frames - 1, ::-1]  # by frame distance from the last query frame
    dist = np.arange(frames)
    right.plot(dist, dist, color="grey", ls="--", lw=1, label="original (= distance)")
    right.plot(dist, last, "o-", ms=2, label=f"VRPR, query frame {frames - 1}")
    right.axhline(clip, color="red", ls=":", lw=1, label=f"largest trained ({clip})")
    right.set_xlabel("frame distance to the key")
    right.set_ylabel("relative position")
    right.set_title("from the last query frame", fontsize=9)
    right.legend(fontsize=7)
    yield "vrpr-positions", fig


# --------------------------------------------------------------------------------------------- UltraViCo


def ultravico_data(recipe, spec) -> dict[str, np.ndarray]:
    """Which frame pairs UltraViCo decays or hides: ``far`` (F, F) share of a frame pair's token pairs whose
    positive logits are scaled by alpha, ``hidden`` (F, F) share the first-frame rule hides (-inf)."""
    import torch

    from longvid.core.far_decay import far_mask, first_frame_mask, half_window

    cfg = recipe.methods["ultravico"]
    stage = _stage(recipe, "ultravico")
    frames = spec.latent_frames(stage.num_frames)
    train = cfg.train_frames or _trained_frames(spec)
    p = _tokens_per_frame(frames)
    tokens = torch.arange(frames * p)
    m, n = tokens[:, None], tokens[None, :]  # every (query, key) token pair
    return {"far": _pair_share(far_mask(m, n, p, train, cfg.rule), frames, p),
            "hidden": _pair_share(first_frame_mask(m, n, p, train, cfg.first_frame), frames, p),
            "half_window_frames": np.array(half_window(p, train) / p), "train_frames": np.array(train),
            "tokens_per_frame": np.array(p)}


def _draw_ultravico(recipe, spec) -> Figures:
    cfg = recipe.methods["ultravico"]
    d = ultravico_data(recipe, spec)
    frames, train = d["far"].shape[0], int(d["train_frames"])
    inactive = "; inactive at this length (gate)" if cfg.gate and frames <= train else ""
    fig = _figure(4.6, f"ultravico: far pairs' positive logits x alpha={cfg.alpha} (rule {cfg.rule}: beyond "
                       f"{float(d['half_window_frames']):g} frames, N={train}), first_frame={cfg.first_frame}\n"
                       f"{frames} latent frames, {int(d['tokens_per_frame'])} tokens/frame{inactive}")
    left, right = fig.subplots(1, 2)
    im = _pair_axes(left, d["far"], "decayed (far) share", cmap="Reds")
    fig.colorbar(im, ax=left, shrink=0.8)
    im = _pair_axes(right, d["hidden"], "hidden by the first-frame rule", cmap="Greys")
    fig.colorbar(im, ax=right, shrink=0.8)
    yield "far-pairs", fig


# ------------------------------------------------------------------------------------- RoPE extrapolation


ROPE_METHODS = ("riflex", "ntk", "pi", "yarn")


def rope_data(recipe, spec, name: str | None = None) -> dict[str, np.ndarray]:
    """The temporal RoPE band before and after method ``name``'s edit at the recipe's length (None: the recipe's
    RoPE method; there is at most one).

    ``inv_before`` / ``inv_after`` (d/2,): frequencies per position; ``step_after``: positions advanced per
    latent frame (PI < 1); ``period_before`` / ``period_after``: latent frames per turn; ``edited``: 0 when the
    method leaves this length alone (a gate, or s <= 1).
    """
    import torch

    from longvid.core.rope import inverse_frequencies
    from longvid.registry import method_class

    name = name or next(m for m in recipe.methods if m in ROPE_METHODS and recipe.methods[m] is not None)
    cfg = recipe.methods[name]
    test = spec.latent_frames(_stage(recipe, name).num_frames)
    train = _trained_frames(spec)
    dim = ROPE_TEMPORAL_DIMS[spec.name]
    edit = method_class(name)(cfg).edit(test, train, spec, dim)  # the method's own decision, gate included
    inv = inverse_frequencies(dim, spec.rope_theta)
    positions = torch.arange(test, dtype=torch.float64)
    inv_after = edit.frequencies(inv) if edit is not None and edit.frequencies is not None else inv
    pos_after = edit.positions(positions) if edit is not None and edit.positions is not None else positions
    step = float(pos_after[1] - pos_after[0]) if test > 1 else 1.0
    return {"inv_before": inv.numpy(), "inv_after": inv_after.numpy(),
            "positions_before": positions.numpy(), "positions_after": pos_after.numpy(),
            "period_before": (2 * math.pi / inv).numpy(), "period_after": (2 * math.pi / (inv_after * step)).numpy(),
            "test_frames": np.array(test), "train_frames": np.array(train), "edited": np.array(edit is not None)}


def _rope_drawer(name: str) -> Callable[[Any, Any], Figures]:
    def draw(recipe, spec) -> Figures:
        d = rope_data(recipe, spec, name)
        cfg = recipe.methods[name]
        test, train = int(d["test_frames"]), int(d["train_frames"])
        settings = ", ".join(f"{k}={v}" for k, v in vars(cfg).items() if k != "stages")
        change = "" if d["edited"] else "; no change at this length"
        fig = _figure(4.4, f"{name} ({settings}): temporal RoPE band ({d['inv_before'].size} frequencies), "
                           f"L={test}, N={train} latent frames{change}")
        left, right = fig.subplots(1, 2)
        j = np.arange(1, d["inv_before"].size + 1)
        left.semilogy(j, d["period_before"], "o", color="grey", ms=4, label="before")
        left.semilogy(j, d["period_after"], "x", color="C3", ms=5, label="after")
        left.axhline(train, color="C0", ls=":", lw=1, label=f"trained length N={train}")
        left.axhline(test, color="C2", ls="--", lw=1, label=f"video length L={test}")
        left.set_xlabel("frequency index j (1-based)")
        left.set_ylabel("period (latent frames per turn)")
        left.set_title("period of each temporal frequency", fontsize=9)
        left.legend(fontsize=7)
        # of the frequencies the edit changes (all, if none), the one whose period is nearest the video's length
        changed = ~np.isclose(d["period_after"], d["period_before"], rtol=1e-9, atol=0)
        distance = np.abs(np.log(d["period_before"] / test))
        k = int(np.argmin(np.where(changed | ~changed.any(), distance, np.inf)))
        frames = np.arange(test)
        right.plot(frames, np.cos(d["positions_before"] * d["inv_before"][k]), color="grey", label="before")
        right.plot(frames, np.cos(d["positions_after"] * d["inv_after"][k]), color="C3", label="after")
        right.axvspan(0, train - 1, color="C0", alpha=0.1, label="trained range")
        right.set_xlabel("latent frame")
        right.set_ylabel(f"cos(angle) of frequency j={k + 1}")
        right.set_title(f"frequency {k + 1} over the video", fontsize=9)
        right.legend(fontsize=7, loc="lower left")
        yield "frequencies", fig

    return draw


# ---------------------------------------------------------------------------------------------- FreeSwim


def freeswim_data(recipe, spec) -> dict[str, np.ndarray]:
    """The inward window of a few query tokens on one frame of the refine stage's token grid.

    ``window`` / ``truncated`` (Q, H, W): keys of each query with the recipe's rule (inward or not) and with a
    window cut at the border (the ablation); ``queries`` (Q, 2) rows and columns; ``half`` (2,); ``base`` (2,) base size in tokens.
    """
    import torch

    from longvid.core.freeswim import SwimSelfOp
    from longvid.core.swin_geometry import window_member
    from longvid.recipe.stages import plan_stages

    cfg = recipe.methods["freeswim"]
    stage = _stage(recipe, "freeswim")
    first = plan_stages(recipe)[0]
    base = tuple(cfg.base) if cfg.base is not None else (first.height, first.width)  # as FreeSwim.apply
    frames, rows, cols = _token_grid(spec, stage.num_frames, stage.height, stage.width)
    op = SwimSelfOp(None, base, (stage.height, stage.width), cfg.scale, cfg.inward, cfg.backend, cfg.token_order)
    grid, half, base_tokens = op.geometry(SimpleNamespace(frames=frames, height=rows, width=cols))
    queries = np.array([(0, 0), (0, cols // 2), (rows // 2, cols // 2), (rows - 1, cols - 1)])
    q = torch.as_tensor(queries[:, 0] * cols + queries[:, 1])[:, None]  # (Q, 1) tokens of frame 0
    k = torch.arange(rows * cols)[None, :]  # (1, H*W): one frame's keys (windows ignore frames)
    return {"window": window_member(q, k, grid, half, cfg.inward).reshape(-1, rows, cols).numpy(),
            "truncated": window_member(q, k, grid, half, False).reshape(-1, rows, cols).numpy(),
            "queries": queries, "half": np.array(half), "base": np.array(base_tokens), "grid": np.array(grid)}


def _draw_freeswim(recipe, spec) -> Figures:
    cfg = recipe.methods["freeswim"]
    d = freeswim_data(recipe, spec)
    stage = _stage(recipe, "freeswim")
    (hh, hw), (bh, bw), (_, rows, cols) = d["half"], d["base"], d["grid"]
    rule = "shifted inside at the border" if cfg.inward else "truncated at the border"
    fig = _figure(6.4, f"freeswim: {2 * hh + 1}x{2 * hw + 1}-token window ({rule}) from the {bh}x{bw}-token base, "
                       f"on the {rows}x{cols}-token grid of stage '{stage.name}' ({stage.height}x{stage.width} px), "
                       f"in every frame; scale {cfg.scale}, mode {cfg.mode}\nblue: keys a query sees; dashed: a "
                       "window truncated at the border (the ablation)")
    for ax, window, cut, (r, c) in zip(fig.subplots(2, 2).flat, d["window"], d["truncated"], d["queries"]):
        ax.imshow(window, cmap="Blues", vmin=0, vmax=1.6, interpolation="nearest")
        ax.contour(cut.astype(float), levels=[0.5], colors="darkorange", linestyles="--", linewidths=1.2)
        ax.plot([c], [r], marker="*", color="red", ms=10, clip_on=False)
        ax.set_title(f"query at row {r}, column {c}: {int(window.sum())} keys/frame", fontsize=9)
        ax.set_xlabel("token column")
        ax.set_ylabel("token row")
    yield "window", fig


# ------------------------------------------------------------------------------------------ Pyramid Flow


def pyramid_flow_data(recipe, spec) -> dict[str, np.ndarray]:
    """Pyramid Flow's unit plan: per stage the timesteps of the image unit and of the video units, the σ range,
    the latent size, and the history the last unit sees.

    ``image_t`` / ``video_t``: lists of (steps,) timesteps per stage; ``stage_t`` (3, 2) (t_max, t_min);
    ``start_sigma`` / ``nominal_sigma`` / ``end_sigma`` (3,); ``latent_sizes`` (3, 2); ``history`` (3, units):
    the resolution stage of each earlier latent in the last unit's history (-1: not in it).
    """
    import torch

    from longvid.models.pyramid_flow.pyramid import history_plan, pyramid
    from longvid.models.pyramid_flow.scheduler import PyramidSchedule
    from longvid.models.specs import PyramidFlowOptions

    options = PyramidFlowOptions(**recipe.model.options)
    video_steps = options.video_steps or [recipe.sampler.steps] * 3  # as the adapter's UnitSettings
    schedule = PyramidSchedule()
    units = spec.latent_frames(recipe.video.num_frames)
    latent = torch.zeros(1, 1, 1, recipe.video.height // spec.vae_spatial, recipe.video.width // spec.vae_spatial)
    sizes = [tuple(level.shape[-2:]) for level in pyramid(latent, schedule.stages)]
    history = np.full((schedule.stages, units), -1)
    for stage in range(schedule.stages):
        for frame, level in history_plan(units - 1, stage):
            history[stage, frame] = level
    return {"image_t": [schedule.timesteps(n, s).numpy() for s, n in enumerate(options.image_steps)],
            "video_t": [schedule.timesteps(n, s).numpy() for s, n in enumerate(video_steps)],
            "stage_t": np.array(schedule.stage_timesteps), "start_sigma": np.array(schedule.start_sigmas),
            "nominal_sigma": np.array(schedule.ori_start_sigmas), "end_sigma": np.array(schedule.end_sigmas),
            "latent_sizes": np.array(sizes), "history": history, "units": np.array(units)}


def _draw_pyramid_flow(recipe, spec) -> Figures:
    d = pyramid_flow_data(recipe, spec)
    units, stages = int(d["units"]), len(d["latent_sizes"])
    px = [f"{h * 8}x{w * 8} px ({h}x{w} latent)" for h, w in d["latent_sizes"]]
    steps = "/".join(str(t.size) for t in d["image_t"]), "/".join(str(t.size) for t in d["video_t"])
    variant = recipe.model.variant or spec.variants[0]
    fig = _figure(6.4, f"Pyramid Flow ({variant}): {units} units x {stages} stages; image unit {steps[0]} steps, "
                       f"video units {steps[1]} steps per stage")
    top, bottom = fig.subplots(2, 1)
    for label, series, style in (("image unit (unit 0)", d["image_t"], "o-"), ("video units", d["video_t"], "x-")):
        x0 = 0
        for s, t in enumerate(series):
            top.plot(np.arange(x0, x0 + t.size), t, style, ms=3, color=f"C{s}",
                     label=f"{label}" if s == 0 else None, alpha=1.0 if "image" in label else 0.6)
            x0 += t.size
    for s, (t_max, t_min) in enumerate(d["stage_t"]):
        top.axhspan(t_min, t_max, color=f"C{s}", alpha=0.08)
    top.set_xlabel("step (stages one after another)")
    top.set_ylabel("timestep t told to the DiT")
    top.set_title("timesteps per stage (colours: the stages below; bands: each stage's [t_min, t_max])", fontsize=9)
    top.legend(fontsize=7, loc="lower left")
    for s in range(stages):
        start, nominal, end = d["start_sigma"][s], d["nominal_sigma"][s], d["end_sigma"][s]
        bottom.barh(s, start - end, left=end, color=f"C{s}", alpha=0.7)
        bottom.plot([nominal], [s], "k|", ms=14)
        bottom.text((start + end) / 2, s, f"{start:.3f} -> {end:.3f}", fontsize=8, ha="center", va="center")
    bottom.set_yticks(range(stages), [f"stage {s}\n{px[s]}" for s in range(stages)], fontsize=7)
    bottom.set_xlim(1.15, -0.02)  # noise on the left, as sampling runs
    bottom.set_xlabel("sigma (| = nominal start; bars start at the start raised for the re-noised jump)")
    bottom.set_title("sigma range of each stage", fontsize=9)
    yield "schedule", fig

    fig = _figure(3.6, f"Pyramid Flow: the history the last unit ({units - 1}) sees at each stage "
                       "(earlier latents, newest at the highest resolution)")
    ax = fig.subplots()
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#eeeeee", "C0", "C1", "C2"][: stages + 1])
    ax.imshow(d["history"] + 1, cmap=cmap, vmin=0, vmax=stages, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    ax.set_xlabel("latent frame (unit)")
    ax.set_ylabel("stage of the last unit")
    for s in range(stages):
        ax.plot([], [], "s", color=f"C{s}", label=f"at {px[s]}")
    ax.plot([], [], "s", color="#eeeeee", label="not seen (the unit itself)")
    fig.legend(fontsize=7, loc="outside lower center", ncol=stages + 1)
    yield "history", fig


#: method name -> drawer(recipe, spec) yielding ``(what, figure)``
DRAWERS: dict[str, Callable[[Any, Any], Figures]] = {
    "freenoise": _draw_freenoise,
    "freelong": _draw_freelong,
    "freeloc": _draw_freeloc,
    "ultravico": _draw_ultravico,
    **{name: _rope_drawer(name) for name in ROPE_METHODS},
    "freeswim": _draw_freeswim,
}
