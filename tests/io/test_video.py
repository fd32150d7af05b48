"""VideoWriter: files read back with imageio-ffmpeg, all-or-nothing output, overwrite rules."""

from __future__ import annotations

import gc
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from longvid.errors import LongvidError, OutputExistsError
from longvid.io.video import VideoWriter, pad_to_even, read_video_frames, read_video_meta, to_uint8_frames

F, H, W = 9, 18, 34


def gradient(frames: int = F, height: int = H, width: int = W) -> np.ndarray:
    """Smooth uint8 RGB frames (a moving diagonal gradient): easy for H.264, so the error stays small."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    r = 20 + 200 * x / max(width - 1, 1)
    g = 20 + 200 * y / max(height - 1, 1)
    b = 60 + 8 * t + (x + y) / 2
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).round().astype(np.uint8)


def as_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (1, 3, F, H, W) in [-1, 1], the decoder's output layout."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def wait_for(path, timeout: float = 10.0) -> None:
    """Wait until ffmpeg has created its output, so failure tests really exercise the cleanup."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"ffmpeg never created {path}"
        time.sleep(0.01)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# -- to_uint8_frames ----------------------------------------------------------------------------------


def test_to_uint8_rounds_and_clamps():
    # (x+1)*127.5 = 10.6 must give 11 (truncation would give 10); out-of-range values clamp.
    vals = torch.tensor([-1.5, -1.0, 10.6 / 127.5 - 1, 10.4 / 127.5 - 1, 1.0, 1.3])
    x = vals.view(1, 1, 6, 1, 1).expand(1, 3, 6, 1, 1)
    out = to_uint8_frames(x)
    assert out.shape == (6, 1, 1, 3) and out.dtype == np.uint8
    assert out[:, 0, 0, 0].tolist() == [0, 0, 11, 10, 255, 255]


def test_to_uint8_layout_and_4d_input():
    frames = gradient()
    back = to_uint8_frames(as_tensor(frames)[0])  # (C, F, H, W)
    assert back.shape == (F, H, W, 3)
    np.testing.assert_array_equal(back, frames)


def test_to_uint8_rejects_batches():
    with pytest.raises(ValueError, match="batch size 1"):
        to_uint8_frames(torch.zeros(2, 3, 1, 4, 4))


def test_pad_to_even_replicates_edges():
    frames = gradient(2, 5, 7)
    padded = pad_to_even(frames)
    assert padded.shape == (2, 6, 8, 3)
    np.testing.assert_array_equal(padded[:, :5, :7], frames)
    np.testing.assert_array_equal(padded[:, 5, :7], frames[:, 4])
    np.testing.assert_array_equal(padded[:, :5, 7], frames[:, :, 6])


# -- MP4 round trips ----------------------------------------------------------------------------------


def test_mp4_even_size_reads_back(tmp_path):
    path = tmp_path / "even.mp4"
    frames = gradient()
    with VideoWriter(path, fps=16) as w:
        w.write(frames)
    assert w.frames_written == F and w.size == (W, H)
    meta = read_video_meta(path)
    assert (meta["frames"], meta["width"], meta["height"], meta["codec"]) == (F, W, H, "h264")
    assert meta["fps"] == pytest.approx(16.0)
    assert mae(read_video_frames(path), frames) < 6
    assert listing(tmp_path) == ["even.mp4"]


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    frames = gradient(F, 17, 33)
    with VideoWriter(path, fps=12) as w:
        w.write(frames)
    assert w.size == (33, 17)  # the original size is kept
    meta = read_video_meta(path)
    assert (meta["frames"], meta["width"], meta["height"]) == (F, 34, 18)
    assert meta["fps"] == pytest.approx(12.0)
    back = read_video_frames(path)
    assert mae(back[:, :17, :33], frames) < 6  # padding added, nothing rescaled


def test_chunks_equal_one_write(tmp_path):
    frames = gradient()
    with VideoWriter(tmp_path / "one.mp4", fps=16) as w:
        w.write(as_tensor(frames))
    with VideoWriter(tmp_path / "chunks.mp4", fps=16) as w:
        for start, stop in [(0, 1), (1, 5), (5, 9)]:  # like a causal VAE: 1 frame, then 4 per chunk
            w.write(as_tensor(frames)[:, :, start:stop])
        assert w.frames_written == F
    one, chunks = read_video_meta(tmp_path / "one.mp4"), read_video_meta(tmp_path / "chunks.mp4")
    assert one["frames"] == chunks["frames"] == F
    np.testing.assert_array_equal(read_video_frames(tmp_path / "one.mp4"), read_video_frames(tmp_path / "chunks.mp4"))


def test_ffv1_mkv_is_exactly_lossless_for_odd_sizes(tmp_path):
    path = tmp_path / "dump.mkv"
    frames = np.random.default_rng(0).integers(0, 256, (F, 17, 33, 3), dtype=np.uint8)  # worst case for lossy
    with VideoWriter(path, fps=8, codec="ffv1") as w:
        w.write(frames[:4])
        w.write(frames[4:])
    assert w.pix_fmt == "bgr0"
    meta = read_video_meta(path)
    assert (meta["frames"], meta["width"], meta["height"], meta["codec"]) == (F, 33, 17, "ffv1")
    np.testing.assert_array_equal(read_video_frames(path), frames)


def test_fractional_fps(tmp_path):
    path = tmp_path / "ntsc.mp4"
    with VideoWriter(path, fps=Fraction(24000, 1001)) as w:
        w.write(gradient(3))
    assert read_video_meta(path)["fps"] == pytest.approx(23.976, abs=0.01)


def test_crf_changes_the_file(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (F, H, W, 3), dtype=np.uint8)
    for crf in (0, 40):
        with VideoWriter(tmp_path / f"crf{crf}.mp4", fps=16, crf=crf, preset="ultrafast") as w:
            w.write(frames)
    assert (tmp_path / "crf0.mp4").stat().st_size > 2 * (tmp_path / "crf40.mp4").stat().st_size


def test_faststart_puts_the_index_first(tmp_path):
    path = tmp_path / "fast.mp4"
    with VideoWriter(path, fps=16) as w:
        w.write(gradient())
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


# -- all-or-nothing -----------------------------------------------------------------------------------


def test_exception_mid_write_leaves_no_file(tmp_path):
    path = tmp_path / "fail.mp4"
    with pytest.raises(RuntimeError, match="decoder blew up"):
        with VideoWriter(path, fps=16) as w:
            w.write(gradient()[:4])
            assert w.tmp_path.name.startswith(".fail.mp4.") and w.tmp_path.suffix == ".mp4"
            wait_for(w.tmp_path)
            raise RuntimeError("decoder blew up")
    assert listing(tmp_path) == []
    assert w._proc is not None and w._proc.poll() is not None  # ffmpeg was stopped, not left running


def test_keyboard_interrupt_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "ctrl_c.mp4", fps=16) as w:
            w.write(gradient())
            wait_for(w.tmp_path)
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_temporary_file_is_used_while_writing(tmp_path):
    path = tmp_path / "busy.mp4"
    with VideoWriter(path, fps=16) as w:
        w.write(gradient())
        wait_for(w.tmp_path)
        assert not path.exists()  # the final name appears only on a clean exit
    assert listing(tmp_path) == ["busy.mp4"]


def test_size_change_between_chunks_fails_cleanly(tmp_path):
    with pytest.raises(ValueError, match="differs"):
        with VideoWriter(tmp_path / "sizes.mp4", fps=16) as w:
            w.write(gradient())
            wait_for(w.tmp_path)
            w.write(gradient(2, H, W + 2))
    assert listing(tmp_path) == []


def test_no_frames_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "empty.mp4", fps=16):
            pass
    assert listing(tmp_path) == []


def test_bad_input_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        VideoWriter(tmp_path / "a.mp4", fps=16).write(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "b.mp4", fps=0)
    with pytest.raises(ValueError, match="mkv"):
        VideoWriter(tmp_path / "c.mp4", fps=16, codec="ffv1")
    assert listing(tmp_path) == []


# -- overwrite ----------------------------------------------------------------------------------------


def test_existing_file_without_overwrite_is_refused_and_untouched(tmp_path):
    path = tmp_path / "taken.mp4"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError) as info:
        VideoWriter(path, fps=16)
    msg = str(info.value)
    assert isinstance(info.value, LongvidError) and "\n" not in msg
    assert "taken.mp4" in msg and "--overwrite" in msg
    assert path.read_bytes() == b"precious"
    assert listing(tmp_path) == ["taken.mp4"]


def test_existing_file_with_overwrite_is_replaced(tmp_path):
    path = tmp_path / "taken.mp4"
    path.write_bytes(b"old")
    with VideoWriter(path, fps=16, overwrite=True) as w:
        w.write(gradient())
    assert read_video_meta(path)["frames"] == F
    assert listing(tmp_path) == ["taken.mp4"]


def test_file_appearing_during_write_is_not_clobbered(tmp_path):
    # Another worker finishes the same item while we encode: without --overwrite we must not replace it.
    path = tmp_path / "race.mp4"
    with pytest.raises(OutputExistsError):
        with VideoWriter(path, fps=16) as w:
            w.write(gradient())
            path.write_bytes(b"theirs")
    assert path.read_bytes() == b"theirs"
    assert listing(tmp_path) == ["race.mp4"]


def test_failed_write_with_overwrite_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.mp4"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with VideoWriter(path, fps=16, overwrite=True) as w:
            w.write(gradient())
            wait_for(w.tmp_path)
            raise RuntimeError("oom")
    assert path.read_bytes() == b"old"
    assert listing(tmp_path) == ["keep.mp4"]


def test_writer_dropped_without_close_leaves_nothing(tmp_path):
    # Used without `with` and lost (e.g. an exception in the caller): __del__ must clean up.
    w = VideoWriter(tmp_path / "dropped.mp4", fps=16)
    w.write(gradient())
    wait_for(w.tmp_path)
    proc = w._proc
    del w
    gc.collect()
    assert listing(tmp_path) == []
    assert proc.poll() is not None
