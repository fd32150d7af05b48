"""Weight-free long-video quality metrics, computed in one streaming pass (notes §6, docs/metrics.md).

Frames arrive downscaled (longer side ≤ ``max_side``, :mod:`longvid.eval.frames`). Each metric group is an
accumulator that sees every frame once and keeps only small state: a number or a 512-bin histogram per frame,
the previous frame, and a ≤64-px luma thumbnail per frame for the temporal spectrum and repetition. Intensities
are on a 0..1 scale (255 grey levels = 1.0) everywhere.

The flow metrics need OpenCV (``opencv-python-headless``, the ``metrics`` extra), imported lazily: without it
their keys are ``None`` and ``notes`` says how to install it; every other metric is still computed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longvid.eval.frames import DEFAULT_MAX_SIDE, AreaResize, fit_size, open_frames
from longvid.io.sidecar import read_sidecar, sidecar_path

CV2_NOTE = "warp_error, flow_mag need OpenCV: pip install 'longvid[metrics]'"
#: Result keys holding one number each, in the order reports show them.
SCALAR_METRICS = ("mafd", "mafd_spike", "flicker_2nd", "vbench_flicker", "temporal_hf_ratio", "warp_error",
                  "flow_mag", "seam_score", "sharpness_drift", "color_drift", "repetition", "repetition_lag")
#: Rec. 601 luma weights, divided by 255 so luma lands in [0, 1].
_LUMA = np.array([0.299, 0.587, 0.114], np.float32) / 255
#: Longer side of the luma thumbnails behind temporal_hf_ratio and repetition.
THUMB_SIDE = 64
#: temporal_hf_ratio counts energy above this fraction of the Nyquist frequency (0.5 cycles per frame).
HF_CUTOFF = 0.25
#: Shortest lag a repetition may have: at lag 1 every smooth video "repeats".
MIN_LAG = 2
#: repetition_lag is the first lag whose recurrence reaches this share of the peak, so that a loop reports its
#: period and not a multiple of it (lags 16, 32, 48 of a 16-frame loop recur equally).
LAG_SHARE = 0.9
#: Below this repetition, repetition_lag is None: random content recurs by chance by up to ~0.2 (a pan over
#: noise), while a loop or a RoPE wrap-around brings frames back nearly whole (≈ 1.6 for a clean loop).
MIN_REPETITION = 0.5
#: Bits kept per colour channel in the joint RGB histogram (3 → 8 levels, 512 bins).
HIST_BITS = 3
#: A mean frame difference below this (0..1 scale; 0.026 grey levels) is invisible: ratios floor it there.
DIFF_FLOOR = 1e-4
#: The same for a Laplacian variance (of luma on 0..1): a flat frame.
SHARPNESS_FLOOR = 1e-8
#: Farneback parameters (pyramid scale, levels, window, iterations, poly_n, poly_sigma, flags): OpenCV's sample.
_FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)


@dataclass
class Frame:
    """One analysed frame and the luma several metrics share."""

    rgb: np.ndarray  # uint8 (h, w, 3)
    luma: np.ndarray  # float32 (h, w) in [0, 1]


def prepare(rgb: np.ndarray) -> Frame:
    return Frame(rgb, rgb @ _LUMA)  # (h, w, 3) @ (3,) -> (h, w) float32


def ratio(value: float, reference: float, floor: float) -> float:
    """``value / reference`` of two non-negative statistics, with ``reference`` floored at ``floor`` so that a
    still video with one cut gives a large finite number; 1.0 (no change) when both are below ``floor``."""
    if max(value, reference) < floor:
        return 1.0
    return float(value / max(reference, floor))


# -- frame differences: mafd, mafd_spike, flicker_2nd, vbench_flicker, seam_score ------------------------------


class FrameDiffs:
    """Per-transition mean absolute RGB difference and per-frame mean luma (two numbers per frame)."""

    def __init__(self, seams: list[int] | None = None):
        self.seams = seams
        self.diffs: list[float] = []  # diffs[t - 1]: transition t-1 -> t
        self.means: list[float] = []
        self._prev: np.ndarray | None = None

    def add(self, frame: Frame) -> None:
        self.means.append(float(frame.luma.mean()))
        if self._prev is not None:
            self.diffs.append(float(np.abs(frame.rgb.astype(np.int16) - self._prev).mean()) / 255)
        self._prev = frame.rgb

    def result(self) -> dict[str, Any]:
        diffs = np.asarray(self.diffs)  # (F-1,)
        return {"mafd": mafd(diffs), "mafd_spike": mafd_spike(diffs), "flicker_2nd": flicker_2nd(self.means),
                "vbench_flicker": vbench_flicker(diffs), "seam_score": seam_score(diffs, self.seams)}


def mafd(diffs: np.ndarray) -> float:
    """Mean absolute frame difference: mean over transitions of mean |f_t − f_t-1| over pixels and RGB, 0..1.
    Detects the motion level (0 = a frozen video); compare videos of the same content."""
    return float(diffs.mean())


def mafd_spike(diffs: np.ndarray) -> float:
    """The largest transition's frame difference over the median transition's (1 = even motion).
    Detects cuts, jumps and seams anywhere, without knowing where the windows are."""
    return ratio(float(diffs.max()), float(np.median(diffs)), DIFF_FLOOR)


def flicker_2nd(means: list[float]) -> float | None:
    """Mean |g_t+1 − 2 g_t + g_t-1| of the global mean luma g_t (0..1); ``None`` below 3 frames.
    Detects brightness flicker and pumping; a steady fade or pan has none (a straight line's 2nd difference)."""
    second = np.abs(np.diff(np.asarray(means), n=2))  # (F-2,)
    return float(second.mean()) if second.size else None


def vbench_flicker(diffs: np.ndarray) -> float:
    """VBench's temporal_flickering, (255 − mean |f_t − f_t+1|) / 255 = 1 − mafd (1 = still).
    Detects flicker only on static prompts, where VBench applies it: on moving content it scores motion."""
    return 1.0 - mafd(diffs)


def seam_score(diffs: np.ndarray, seams: list[int] | None) -> float | None:
    """Mean frame difference at the seams (t-1 -> t for each seam frame t) over the median elsewhere (1 = no
    seam); ``None`` without seams or when none falls inside the video.
    Detects visible context-window seams where longvid knows its window boundaries."""
    if seams is None:
        return None
    at = sorted({t - 1 for t in seams if 1 <= t <= len(diffs)})  # indices into diffs
    elsewhere = np.delete(diffs, at)
    if not at or not elsewhere.size:
        return None
    return ratio(float(diffs[at].mean()), float(np.median(elsewhere)), DIFF_FLOOR)


# -- luma thumbnails: temporal_hf_ratio, repetition ---------------------------------------------------------


class Thumbnails:
    """A ≤64-px luma thumbnail per frame (≤16 KB each): the only per-frame images kept."""

    def __init__(self, analysed_size: tuple[int, int]):
        w, h = analysed_size
        thumb_w, thumb_h = fit_size(w, h, THUMB_SIDE)
        self._resize = AreaResize((h, w), (thumb_h, thumb_w)) if (thumb_w, thumb_h) != (w, h) else None
        self.thumbs: list[np.ndarray] = []

    def add(self, frame: Frame) -> None:
        self.thumbs.append(self._resize(frame.luma) if self._resize else frame.luma)

    def result(self) -> dict[str, Any]:
        stack = np.stack(self.thumbs)  # (F, h, w)
        return {"temporal_hf_ratio": temporal_hf_ratio(stack), **repetition(stack)}


def temporal_hf_ratio(stack: np.ndarray) -> float:
    """Share of the per-pixel temporal spectral energy above ``HF_CUTOFF`` × Nyquist (DC excluded), 0..1; 0.0
    for a still video. Detects flicker and jitter: fast temporal change that motion alone rarely makes."""
    x = stack - stack.mean(axis=0)  # (F, h, w): the static image is not flicker
    if np.sqrt(np.mean(x**2)) < DIFF_FLOOR:
        return 0.0
    frames = len(stack)
    # A Hann window keeps the jump between the last and the first frame (the FFT's wrap-around) from leaking
    # into the high band: without it a slow fade would read as flicker.
    x *= np.hanning(frames + 2)[1:-1, None, None].astype(np.float32)
    energy = (np.abs(np.fft.rfft(x, axis=0)) ** 2).sum(axis=(1, 2))  # (F//2 + 1,) per temporal frequency
    freqs = np.fft.rfftfreq(frames)  # cycles per frame; Nyquist is 0.5
    total = energy[1:].sum()
    return float(energy[freqs > HF_CUTOFF * 0.5].sum() / total) if total > 0 else 0.0


def repetition(stack: np.ndarray) -> dict[str, Any]:
    """Recurrence of the autocorrelation of mean-removed thumbnails: max over lags L ≥ ``MIN_LAG`` of
    corr(L) − min over 1 ≤ l ≤ L of corr(l) (0..2), and the lag where it peaks (see ``LAG_SHARE``).
    Detects loops and RoPE wrap-around repetition (RIFLEx's failure mode), repeat_context artefacts."""
    frames = len(stack)
    max_lag = frames // 2
    if max_lag < MIN_LAG:
        return {"repetition": None, "repetition_lag": None}
    # Standardised frames first, so a global brightness or contrast flicker (reported by the flicker metrics)
    # does not read as a period-2 repetition; then minus the average frame, so static content does not count.
    pixels = stack[0].size
    x = _unit_rows(stack.reshape(frames, -1) - stack.mean(axis=(1, 2)).reshape(frames, 1),
                   DIFF_FLOOR * np.sqrt(pixels))  # (F, P); a flat frame (rms contrast < DIFF_FLOOR) stays 0
    # What each frame adds to the average frame; corr is then a cosine similarity. Of unit rows, a deviation
    # shorter than 1e-3 is rounding (a still video) and stays 0.
    x = _unit_rows(x - x.mean(axis=0), 1e-3)
    # Σ_t <x_t, x_t+L> for every lag at once: the per-pixel autocorrelation by FFT, zero-padded to 2F so lags do
    # not wrap around, summed over pixels.
    spectrum = np.fft.rfft(x, n=2 * frames, axis=0)  # (F + 1, P)
    acf = np.fft.irfft((spectrum.real**2 + spectrum.imag**2).sum(axis=1), n=2 * frames)  # (2F,)
    lags = np.arange(1, max_lag + 1)
    corr = acf[lags] / (frames - lags)  # (max_lag,) mean cosine similarity of frames L apart
    rise = (corr - np.minimum.accumulate(corr))[MIN_LAG - 1:]  # (max_lag - 1,) for L = MIN_LAG..max_lag
    peak = float(rise.max())
    if peak < MIN_REPETITION:
        return {"repetition": peak, "repetition_lag": None}
    return {"repetition": peak, "repetition_lag": int(MIN_LAG + np.argmax(rise >= LAG_SHARE * peak))}


def _unit_rows(x: np.ndarray, min_norm: float) -> np.ndarray:
    """Rows ``(F, P)`` scaled to unit length; rows shorter than ``min_norm`` become zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (F, 1)
    return np.where(norms >= min_norm, x / np.maximum(norms, min_norm), 0)


# -- optical flow: warp_error, flow_mag (OpenCV) ------------------------------------------------------------


class FlowStats:
    """Farneback flow t -> t+1 and back; sums of the masked warp error and of the flow magnitude.

    warp_error: mean |f_t − f_t+1 warped back by the flow| (RGB, 0..1) over pixels that pass the forward–backward
    check. Detects temporal inconsistency: content that changes other than by moving (flicker, boiling texture).
    flow_mag: mean flow length, in pixels of the source video per frame.
    Detects a frozen or nearly static video (a "dynamic degree" without RAFT) and motion that stalls or races.
    """

    def __init__(self, cv2, analysed_size: tuple[int, int], source_width: int):
        w, h = analysed_size
        self.cv2 = cv2
        self.grid_x, self.grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        self.to_source_px = source_width / w  # report the magnitude in pixels of the source video
        self.error_sum = self.valid = self.magnitude_sum = self.pixels = 0.0
        self._prev: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, frame: Frame) -> None:
        grey = np.rint(frame.luma * 255).astype(np.uint8)  # (h, w)
        rgb = frame.rgb.astype(np.float32) / 255  # (h, w, 3)
        if self._prev is not None:
            self._transition(*self._prev, grey, rgb)
        self._prev = grey, rgb

    def _transition(self, grey0: np.ndarray, rgb0: np.ndarray, grey1: np.ndarray, rgb1: np.ndarray) -> None:
        cv2 = self.cv2
        fwd = cv2.calcOpticalFlowFarneback(grey0, grey1, None, *_FARNEBACK)  # (h, w, 2): frame0(p) ≈ frame1(p + fwd)
        bwd = cv2.calcOpticalFlowFarneback(grey1, grey0, None, *_FARNEBACK)
        map_x, map_y = self.grid_x + fwd[..., 0], self.grid_y + fwd[..., 1]
        warped = cv2.remap(rgb1, map_x, map_y, cv2.INTER_LINEAR)  # frame1 pulled back onto frame0's pixels
        bwd_there = cv2.remap(bwd, map_x, map_y, cv2.INTER_LINEAR)  # (h, w, 2) backward flow where p lands
        valid = _consistent(fwd, bwd_there) & _inside(map_x, map_y)  # (h, w) not occluded, not off-frame
        error = np.abs(rgb0 - warped).mean(axis=2)  # (h, w)
        self.error_sum += float(error[valid].sum())
        self.valid += int(valid.sum())
        self.magnitude_sum += float(np.hypot(fwd[..., 0], fwd[..., 1]).sum())
        self.pixels += grey0.size

    def result(self) -> dict[str, Any]:
        return {
            "warp_error": self.error_sum / self.valid if self.valid else None,
            "flow_mag": self.magnitude_sum / self.pixels * self.to_source_px,
        }


def _consistent(fwd: np.ndarray, bwd_there: np.ndarray) -> np.ndarray:
    """Forward–backward check (Sundaram et al. 2010): a pixel whose round trip does not come back is occluded
    or mistracked, and its warp error would measure the flow's failure, not the video's."""
    round_trip = ((fwd + bwd_there) ** 2).sum(axis=2)  # (h, w)
    scale = (fwd**2).sum(axis=2) + (bwd_there**2).sum(axis=2)
    return round_trip <= 0.01 * scale + 0.5


def _inside(map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    h, w = map_x.shape
    return (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)


# -- sharpness_drift --------------------------------------------------------------------------------------


class Sharpness:
    """Variance of the luma Laplacian, one number per frame."""

    def __init__(self):
        self.values: list[float] = []

    def add(self, frame: Frame) -> None:
        y = frame.luma
        lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]  # (h-2, w-2)
        self.values.append(float(lap.var()))

    def result(self) -> dict[str, Any]:
        return {"sharpness_drift": sharpness_drift(np.asarray(self.values))}


def sharpness_drift(variances: np.ndarray) -> float:
    """Mean Laplacian variance of the last quarter of the frames over the first quarter's (1 = steady).
    Detects progressive blur and detail loss over a long video (below 1) or growing noise (above 1)."""
    first, last = quarters(variances)
    return ratio(float(last.mean()), float(first.mean()), SHARPNESS_FLOOR)


def quarters(per_frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and the last quarter (at least one frame each) of a per-frame series ``(F, ...)``."""
    n = max(1, len(per_frame) // 4)
    return per_frame[:n], per_frame[-n:]


# -- color_drift, color_drift_by_distance -------------------------------------------------------------------


class ColorHistograms:
    """A joint RGB histogram per frame (512 bins of 8 levels per channel, normalised: 2 KB per frame)."""

    def __init__(self):
        self.hists: list[np.ndarray] = []

    def add(self, frame: Frame) -> None:
        levels = (frame.rgb >> (8 - HIST_BITS)).astype(np.intp)  # (h, w, 3) in [0, 8)
        bins = (levels[..., 0] << (2 * HIST_BITS)) | (levels[..., 1] << HIST_BITS) | levels[..., 2]  # (h, w)
        counts = np.bincount(bins.ravel(), minlength=1 << (3 * HIST_BITS))
        self.hists.append((counts / bins.size).astype(np.float32))

    def result(self) -> dict[str, Any]:
        hists = np.stack(self.hists)  # (F, 512)
        return {"color_drift": color_drift(hists), "color_drift_by_distance": color_drift_by_distance(hists)}


def color_drift(hists: np.ndarray) -> float:
    """χ² distance (0..1) between the RGB histograms of the first and the last quarter of the frames.
    Detects palette and identity drift over a long video (a subject-consistency proxy without a model)."""
    first, last = quarters(hists)
    return float(chi2(first.mean(axis=0), last.mean(axis=0)))


def color_drift_by_distance(hists: np.ndarray) -> list[dict[str, float]]:
    """Mean χ² between the histograms of frames 1, 2, 4, ... (< F) apart: ``[{"distance", "chi2"}, ...]``.
    Tells steady drift (growing with the distance) from flicker (already high at distance 1)."""
    distances = [1 << k for k in range((len(hists) - 1).bit_length())]
    return [{"distance": d, "chi2": float(chi2(hists[:-d], hists[d:]).mean())} for d in distances]


def chi2(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Symmetric χ² distance ½ Σ (p − q)² / (p + q) between normalised histograms ``(..., bins)``: 0 for equal
    histograms, 1 for disjoint ones."""
    total = p + q
    return 0.5 * np.where(total > 0, (p - q) ** 2 / np.where(total > 0, total, 1), 0).sum(axis=-1)


# -- the whole pass ------------------------------------------------------------------------------------------


def load_cv2():
    """OpenCV, or ``None`` when it is not installed (the flow metrics are then skipped)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def accumulators(analysed_size: tuple[int, int], source_size: tuple[int, int], seams: list[int] | None = None,
                 cv2=None) -> dict[str, Any]:
    """Every metric group's accumulator by name (``add(frame)`` per frame, then ``result()``); ``flow`` only
    when ``cv2`` is given."""
    groups: dict[str, Any] = {"frame_diffs": FrameDiffs(seams), "thumbnails": Thumbnails(analysed_size),
                              "sharpness": Sharpness(), "color": ColorHistograms()}
    if cv2 is not None:
        groups["flow"] = FlowStats(cv2, analysed_size, source_size[0])
    return groups


def measure(source: str | os.PathLike | np.ndarray, seams: list[int] | None = None,
            max_side: int = DEFAULT_MAX_SIDE) -> dict[str, Any]:
    """Every metric of a video file or a uint8 array ``(F, H, W, 3)`` in one streaming pass.

    ``seams`` are pixel-frame indices t where a new window starts (``seam_score`` compares the t-1 -> t
    transitions with the rest). Returns ``frames``, ``fps`` (``None`` for an array), ``size`` and
    ``analysed_size`` (``[width, height]``), every key of ``SCALAR_METRICS``, ``color_drift_by_distance``,
    ``seams`` and ``notes`` (a list of strings). Raises ``ValueError`` for a video of fewer than 2 frames.
    """
    seams = None if seams is None else [int(t) for t in seams]
    cv2 = load_cv2()
    with open_frames(source, max_side) as video:
        groups = accumulators(video.analysed_size, video.size, seams, cv2)
        for rgb in video:
            frame = prepare(rgb)
            for group in groups.values():
                group.add(frame)
    if video.count < 2:
        raise ValueError(f"need at least 2 frames to measure a video, got {video.count}")
    found: dict[str, Any] = {"warp_error": None, "flow_mag": None}
    for group in groups.values():
        found.update(group.result())
    return {"frames": video.count, "fps": video.fps, "size": list(video.size),
            "analysed_size": list(video.analysed_size), **{key: found[key] for key in SCALAR_METRICS},
            "color_drift_by_distance": found["color_drift_by_distance"], "seams": seams,
            "notes": [] if cv2 is not None else [CV2_NOTE]}


def sidecar_seams(video_path: str | os.PathLike) -> list[int] | None:
    """The ``"seams"`` list of the video's longvid sidecar (``x.mp4`` -> ``x.json``), or ``None`` when there is no
    sidecar, it is not longvid's (unreadable, not JSON, no ``longvid_sidecar`` key) or it has no seams. Raises
    ``ValueError`` when a longvid sidecar's ``"seams"`` is not a list of integers."""
    path = sidecar_path(video_path)
    if not path.is_file():
        return None
    try:
        data = read_sidecar(path)
    except (OSError, ValueError):  # unreadable, or not JSON: some other program's x.json, not a longvid sidecar
        return None
    if not isinstance(data, dict) or "longvid_sidecar" not in data:
        return None  # JSON, but not longvid's: it says nothing about seams
    seams = data.get("seams")
    if seams is None:
        return None
    if not isinstance(seams, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in seams):
        raise ValueError(f"{path}: \"seams\" must be a list of frame indices, got {seams!r}")
    return seams


def measure_path(path: str | os.PathLike, seams: list[int] | None = None,
                 max_side: int = DEFAULT_MAX_SIDE) -> dict[str, Any]:
    """:func:`measure` of a video file, with the seams of its sidecar unless ``seams`` is given; the result
    starts with ``path``."""
    if seams is None:
        seams = sidecar_seams(path)
    return {"path": str(Path(path)), **measure(Path(path), seams=seams, max_side=max_side)}
