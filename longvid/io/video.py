"""Streaming video writer on top of the ffmpeg bundled with ``imageio-ffmpeg``.

Long videos are decoded chunk by chunk, so the writer takes any number of chunks and never holds the
whole video. It drives ``imageio_ffmpeg.write_frames`` directly rather than ``diffusers.export_to_video``,
which needs the separate ``imageio`` package, keeps every frame in memory and truncates instead of
rounding (notes §5).

Output is all-or-nothing: frames go to a hidden temporary file in the target folder (created exclusively
under an unpredictable name, so a planted symlink cannot redirect it), which is renamed onto the final name
only when the ``with`` block ends cleanly (or, split in two, :meth:`VideoWriter.finish` then
:meth:`VideoWriter.publish`, so a caller can publish the video together with its sidecar). An exception or
Ctrl-C kills ffmpeg and deletes the temporary file, so no truncated video is left for a later "skip
existing" run to trust. ffmpeg's thread count is fixed (``threads``), because x264's output depends on it:
the same recipe gives the same file on a machine with any number of CPUs.
"""

from __future__ import annotations

import logging
import os
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import torch

from longvid.io.paths import check_writable, create_exclusive, fsync_file, partial_path, publish, remove_quietly

log = logging.getLogger(__name__)

#: Codecs whose rate control takes ``-crf``/``-preset``; others get no quality flags.
_CRF_CODECS = frozenset({"libx264", "libx264rgb", "libx265"})
#: Lossless codec for debug and metric dumps; its RGB pixel format needs no padding or YUV conversion.
LOSSLESS_CODEC = "ffv1"
_DEFAULT_PIX_FMT = {LOSSLESS_CODEC: "bgr0"}
_FASTSTART_SUFFIXES = frozenset({".mp4", ".mov", ".m4v"})
#: Seconds to wait for a killed ffmpeg to exit before deleting its output.
_KILL_WAIT_S = 10.0


class _AbortWrite(BaseException):
    """Thrown into the ``write_frames`` generator: as a non-``Exception`` it makes it kill ffmpeg at once
    instead of closing stdin and waiting for ffmpeg to finish a (partial) file."""


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """Decoded VAE output in [-1, 1], ``(1, C, F, H, W)`` or ``(C, F, H, W)``, as uint8 ``(F, H, W, C)``.

    Rounds (``export_to_video`` truncates, which darkens every pixel by half a level on average) and
    clamps, computing in float32 on the tensor's device so only uint8 crosses to the CPU.
    """
    if frames.ndim == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"expected batch size 1, got frames of shape {tuple(frames.shape)}")
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[0] not in (1, 3):
        raise ValueError(f"expected (1, C, F, H, W) or (C, F, H, W) with C=3, got {tuple(frames.shape)}")
    pixels = ((frames.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1, -1)
    return np.ascontiguousarray(pixels.permute(1, 2, 3, 0).cpu().numpy())


def _as_uint8_chunk(frames: Any) -> np.ndarray:
    """Accept uint8 ``(F, H, W, 3)``/``(H, W, 3)`` arrays or float tensors in [-1, 1] (see above)."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype == torch.uint8:
            frames = frames.cpu().numpy()
        else:
            return to_uint8_frames(frames)
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 frames of shape (F, H, W, 3) or a float tensor (C, F, H, W), "
            f"got {frames.dtype} {frames.shape}"
        )
    return frames


def _needs_even_size(pix_fmt: str) -> bool:
    """Chroma-subsampled formats (yuv420p, yuv422p, nv12) need even sizes: libx264 fails otherwise."""
    return any(tag in pix_fmt for tag in ("420", "422", "411", "nv12", "nv21"))


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad odd heights/widths by one replicated edge row/column (no rescaling, so no blur)."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


class VideoWriter:
    """Write frames to a video file in chunks; the file appears only when the ``with`` block succeeds.

    >>> with VideoWriter("out/cat.mp4", fps=16) as w:      # doctest: +SKIP
    ...     for chunk in decoder_chunks:                      # float (1, 3, f, H, W) in [-1, 1]
    ...         w.write(chunk)

    ``codec="ffv1"`` with a ``.mkv`` path writes exactly lossless RGB (``pix_fmt`` defaults to ``bgr0``)
    for debug dumps. The first chunk fixes the size; ``.size`` is the original ``(width, height)`` even
    when odd sizes are padded to even for yuv420p. ffmpeg starts on the first chunk, so a writer that
    fails before any frame never spawns a process.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fps: float | Fraction,
        codec: str = "libx264",
        crf: int = 18,
        pix_fmt: str | None = None,
        preset: str = "medium",
        overwrite: bool = False,
        threads: int = 4,
    ):
        self._closed = True  # until construction succeeds, so __del__ has nothing to clean up
        self.path = Path(path)
        self.fps = _check_fps(fps)
        self.codec = codec
        self.crf = crf
        self.pix_fmt = pix_fmt or _DEFAULT_PIX_FMT.get(codec, "yuv420p")
        self.preset = preset
        self.overwrite = overwrite
        self.threads = int(threads)
        self.finished = False
        self.size: tuple[int, int] | None = None
        self.frames_written = 0
        self.tmp_path = partial_path(self.path)
        self._gen = None
        self._proc: subprocess.Popen | None = None
        if codec == LOSSLESS_CODEC and self.path.suffix.lower() != ".mkv":
            raise ValueError(f"codec {codec!r} needs a .mkv path, got {self.path.name}")
        check_writable(self.path, overwrite)
        self._closed = False

    # -- context manager -------------------------------------------------------------------------------

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def __del__(self):
        # A writer dropped without close() (e.g. not used as a context manager) must not leave files.
        if not getattr(self, "_closed", True):
            self.abort()

    # -- writing ---------------------------------------------------------------------------------------

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Append a chunk: uint8 ``(F, H, W, 3)`` or a float tensor ``([1,] 3, F, H, W)`` in [-1, 1]."""
        if self._closed:
            raise RuntimeError(f"VideoWriter for {self.path} is already closed")
        chunk = _as_uint8_chunk(frames)
        self._check_size(chunk)
        if _needs_even_size(self.pix_fmt):
            chunk = pad_to_even(chunk)
        if self._gen is None:
            self._start(width=chunk.shape[2], height=chunk.shape[1])
        for frame in chunk:
            self._gen.send(np.ascontiguousarray(frame))
            self.frames_written += 1

    def _check_size(self, chunk: np.ndarray) -> None:
        size = (int(chunk.shape[2]), int(chunk.shape[1]))
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise ValueError(f"chunk size {size} differs from the first chunk's {self.size} (width, height)")

    def _start(self, width: int, height: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(create_exclusive(self.tmp_path))  # ours, a regular file: ffmpeg then writes into it
        self._gen = imageio_ffmpeg.write_frames(
            str(self.tmp_path),
            size=(width, height),
            fps=self.fps,
            codec=self.codec,
            pix_fmt_in="rgb24",
            pix_fmt_out=self.pix_fmt,
            quality=None,
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=self._output_params(),
        )
        self._gen.send(None)
        self._proc = _popen_of(self._gen)

    def _output_params(self) -> list[str]:
        params: list[str] = ["-threads", str(self.threads)]
        if self.codec in _CRF_CODECS:
            params += ["-crf", str(int(self.crf)), "-preset", self.preset]
        if self.path.suffix.lower() in _FASTSTART_SUFFIXES:
            params += ["-movflags", "+faststart"]  # index up front: players can start before the end
        return params

    # -- finishing -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Finish encoding and publish the file under its final name (atomically)."""
        if self._closed:
            return
        self.finish()
        self.publish()

    def finish(self) -> None:
        """Finish encoding into the temporary file (flushed to disk) without publishing it yet."""
        if self.finished:
            return
        if self._closed or self._gen is None:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        try:
            self._gen.close()  # closes ffmpeg's stdin and waits for it to finish the file
            self._check_ffmpeg_ok()
            fsync_file(self.tmp_path)
        except BaseException:
            self.abort()
            raise
        self.finished = True

    def publish(self) -> None:
        """Move the finished file onto its final name (``finish()`` first); the temporary file is gone after."""
        if not self.finished:
            raise RuntimeError(f"finish() the video before publishing {self.path}")
        self._closed = True
        publish(self.tmp_path, self.path, overwrite=self.overwrite)

    def _check_ffmpeg_ok(self) -> None:
        # write_frames ignores ffmpeg's exit status; an empty or missing file would otherwise be published.
        code = self._proc.returncode if self._proc is not None else 0
        if code != 0 or not self.tmp_path.is_file() or self.tmp_path.stat().st_size == 0:
            raise RuntimeError(f"ffmpeg failed (exit code {code}) writing {self.path}")

    def abort(self) -> None:
        """Stop ffmpeg without finishing the file and delete the temporary file. Safe to call twice."""
        self._closed = True
        gen, self._gen = self._gen, None
        if gen is not None:
            try:
                gen.throw(_AbortWrite())
            except (_AbortWrite, StopIteration):
                pass
            except Exception as err:  # cleanup must not mask the error that caused it
                log.warning("error while stopping ffmpeg: %s", err)
        _wait_dead(self._proc)
        remove_quietly(self.tmp_path)


def _check_fps(fps: float | Fraction) -> float | Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return fps if isinstance(fps, Fraction) else float(fps)


def _popen_of(gen) -> subprocess.Popen | None:
    """The ffmpeg process inside a started ``write_frames`` generator (its local ``p``).

    ``write_frames`` does not expose it, but we need it to check the exit code after a clean close and
    to wait until a killed ffmpeg has really exited before deleting its output. Returns ``None`` if a
    future imageio-ffmpeg renames it; the writer then skips those two checks.
    """
    frame = getattr(gen, "gi_frame", None)
    proc = frame.f_locals.get("p") if frame is not None else None
    return proc if isinstance(proc, subprocess.Popen) else None


def _wait_dead(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    try:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=_KILL_WAIT_S)
    except Exception as err:
        log.warning("ffmpeg did not exit after kill: %s", err)


# -- reading (tests and verification) -------------------------------------------------------------------


def read_video_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``{"frames", "width", "height", "fps", "codec"}`` of a video file, counted by decoding it."""
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(gen)
    finally:
        gen.close()
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["size"]
    codec = str(meta.get("codec", "")).rstrip(",")  # imageio-ffmpeg keeps the comma from ffmpeg's log
    return {"frames": frames, "width": width, "height": height, "fps": meta["fps"], "codec": codec}


def read_video_frames(path: str | os.PathLike) -> np.ndarray:
    """All frames of a (short) video as uint8 ``(F, H, W, 3)``; for tests and metrics on small clips."""
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(gen)
        width, height = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in gen]
    finally:
        gen.close()
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
