"""Stream a video's frames once, downscaled, for the metrics.

A file is decoded by the ffmpeg bundled with ``imageio-ffmpeg`` (notes §5), which also downscales it (an
``-vf scale`` area filter), so only small frames ever reach Python: a 321-frame 480p clip never sits in memory
at full size. An in-memory uint8 array ``(F, H, W, 3)`` (tests, or frames a caller already holds) is
downscaled in numpy with the same area (box-average) rule.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import imageio_ffmpeg
import numpy as np

#: Default longer side of the analysed frames: the metrics compare frames with each other, and full resolution
#: would multiply the cost (flow above all) for defects that are visible at 256 px already.
DEFAULT_MAX_SIDE = 256


class VideoReadError(OSError):
    """The file cannot be decoded as a video; the message names it and ffmpeg's reason."""


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(width, height)`` scaled so the longer side is at most ``max_side`` (aspect kept, never upscaled)."""
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of area resampling along one axis: each output pixel averages the input pixels
    its footprint covers, weighted by the covered length (rows sum to 1)."""
    step = n_in / n_out
    lo = np.arange(n_out)[:, None] * step  # (n_out, 1) footprint start in input pixels
    pix = np.arange(n_in)[None, :]  # (1, n_in) input pixel starts
    covered = np.clip(np.minimum(lo + step, pix + 1) - np.maximum(lo, pix), 0.0, None)  # (n_out, n_in)
    return (covered / step).astype(np.float32)


class AreaResize:
    """Area (box-average) resampling of planes ``(..., H, W)`` to ``(..., h, w)`` as two small matrix products
    (the matrices are built once per size)."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        self.rows = _area_matrix(in_hw[0], out_hw[0])  # (h, H)
        self.cols_t = np.ascontiguousarray(_area_matrix(in_hw[1], out_hw[1]).T)  # (W, w)

    def __call__(self, planes: np.ndarray) -> np.ndarray:
        return np.matmul(np.matmul(self.rows, planes), self.cols_t)  # (..., H, W) -> (..., h, W) -> (..., h, w)


class VideoFrames:
    """Frames of one video, uint8 ``(h, w, 3)`` with the longer side at most ``max_side``; iterate once.

    ``fps`` is the file's frame rate (``None`` for an array), ``size`` the source ``(width, height)``,
    ``analysed_size`` the ``(w, h)`` of the frames yielded, and ``count`` the frames yielded so far (the total
    once iteration has finished). Use as a context manager, or exhaust it, so a file's ffmpeg process ends.
    """

    def __init__(self, frames: Iterator[np.ndarray], *, fps: float | None, size: tuple[int, int],
                 analysed_size: tuple[int, int], closer: Callable[[], None] | None = None):
        self._frames = frames
        self._closer = closer
        self.fps = fps
        self.size = size
        self.analysed_size = analysed_size
        self.count = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame in self._frames:
            self.count += 1
            yield frame

    def close(self) -> None:
        if self._closer is not None:
            self._closer()  # a read_frames generator kills its ffmpeg process on close

    def __enter__(self) -> VideoFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_frames(source: str | os.PathLike | np.ndarray, max_side: int = DEFAULT_MAX_SIDE) -> VideoFrames:
    """Frames of a video file (any format ffmpeg reads) or of a uint8 array ``(F, H, W, 3)``, downscaled so the
    longer side is at most ``max_side``. Raises :class:`VideoReadError` for a file ffmpeg cannot decode."""
    if isinstance(source, np.ndarray):
        return _array_frames(source, max_side)
    return _file_frames(Path(source), max_side)


def _array_frames(video: np.ndarray, max_side: int) -> VideoFrames:
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (F, H, W, 3), got {video.dtype} {video.shape}")
    height, width = video.shape[1:3]
    out_w, out_h = fit_size(width, height, max_side)
    frames = iter(video)
    if (out_w, out_h) != (width, height):
        resize = AreaResize((height, width), (out_h, out_w))
        frames = (_resize_rgb(frame, resize) for frame in video)
    return VideoFrames(frames, fps=None, size=(width, height), analysed_size=(out_w, out_h))


def _resize_rgb(frame: np.ndarray, resize: AreaResize) -> np.ndarray:
    planes = resize(frame.transpose(2, 0, 1).astype(np.float32))  # (3, H, W) -> (3, h, w)
    return np.ascontiguousarray(np.clip(np.rint(planes), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def _file_frames(path: Path, max_side: int) -> VideoFrames:
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    # "decrease" keeps the aspect ratio inside a max_side box; min() never upscales a small video.
    scale = (f"scale=w='min(iw,{max_side})':h='min(ih,{max_side})':force_original_aspect_ratio=decrease"
             ":flags=area")
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=["-vf", scale])
    try:
        with _quiet_resize_warning():
            meta = next(gen)
    except Exception as err:  # any failure to start decoding means: not a video ffmpeg can read
        gen.close()
        raise VideoReadError(f"cannot decode {path} as a video: {_reason(err)}") from err
    width, height = meta["size"]
    frames = (np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in gen)  # read-only views
    return VideoFrames(frames, fps=float(meta["fps"]) or None, size=tuple(meta["source_size"]),
                       analysed_size=(width, height), closer=gen.close)


@contextlib.contextmanager
def _quiet_resize_warning():
    """imageio-ffmpeg logs a warning whenever the output size differs from the source: here that is the point."""
    logger = logging.getLogger("imageio_ffmpeg")
    drop = _DropMessages("The frame size for reading")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _reason(err: Exception) -> str:
    """ffmpeg's last log line (e.g. "x.mp4: Invalid data found when processing input"), not the whole dump."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
