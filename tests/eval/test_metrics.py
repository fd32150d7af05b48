"""longvid.eval on synthetic 64-frame 96×128 clips: each metric moves the expected way, by the expected order of
magnitude, against a smooth pan (notes §6), in memory and through an MP4; seams from the sidecar; the flow
metrics' OpenCV fallback; folders and bad paths; the table."""

import io
import json
import sys

import cv2
import numpy as np
import pytest
from rich.console import Console

from longvid.errors import RecipeError
from longvid.eval.frames import VideoReadError, fit_size, open_frames
from longvid.eval.metrics import CV2_NOTE, SCALAR_METRICS, measure, measure_path
from longvid.eval.report import measure_paths, render_table
from longvid.io.video import VideoWriter

cv2.setNumThreads(1)

F, H, W = 64, 96, 128
SEAMS = [16, 32, 48]
JUMP = 12  # extra pixels the "seam" clip's pan jumps at each seam


def smooth_noise(shape: tuple[int, ...], sigma: float, seed: int) -> np.ndarray:
    """Gaussian-blurred white noise (blur by FFT, so it is periodic), unit standard deviation."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None, None]
    fx = np.fft.fftfreq(shape[1])[None, :, None]
    out = np.fft.ifft2(np.fft.fft2(noise, axes=(0, 1)) * np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2)),
                       axes=(0, 1)).real
    return out / out.std()


# A photo-like texture wide enough to pan across: fine luma detail, smoother colour.
TEXTURE = np.clip(128 + 40 * smooth_noise((H, W + 2 * F, 1), 2.0, 0)
                  + 20 * smooth_noise((H, W + 2 * F, 3), 6.0, 1), 0, 255)  # (H, W + 2F, 3)
T = np.arange(F)
RAMP = (T / (F - 1))[:, None, None, None]  # (F, 1, 1, 1) from 0 to 1 over the clip


def pan(offsets: np.ndarray = T) -> np.ndarray:
    """The texture seen through a W-wide window at ``offsets`` pixels, float (F, H, W, 3)."""
    return np.stack([TEXTURE[:, o:o + W] for o in offsets])


def box_blur(frames: np.ndarray) -> np.ndarray:
    """5×5 box blur of (F, H, W, 3), edges replicated."""
    padded = np.pad(frames, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    rows = sum(padded[:, i:i + H] for i in range(5)) / 5
    return sum(rows[:, :, i:i + W] for i in range(5)) / 5


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


CLIPS = {
    "pan": to_uint8(pan()),  # 1 px/frame to the right
    "flicker": to_uint8(pan() * np.where(T % 2, 0.8, 1.0)[:, None, None, None]),  # odd frames 20 % darker
    "seam": to_uint8(pan(T + JUMP * (T // 16))),  # the pan jumps JUMP extra pixels at frames 16, 32, 48
    "frozen": to_uint8(np.repeat(pan()[:1], F, axis=0)),
    "loop": to_uint8(pan(T % 16)),  # 16 frames of pan, again and again
    "blur": to_uint8((1 - RAMP) * pan() + RAMP * box_blur(pan())),  # sharp to 5×5-box blurred
    "color": to_uint8(pan() + np.concatenate([-40 * RAMP, 0 * RAMP, 40 * RAMP], axis=-1)),  # red to blue
}


def write_mp4(path, frames: np.ndarray, fps: int = 16) -> None:
    """libx264 yuv420p at crf 18, as a generated video is written."""
    with VideoWriter(path, fps=fps, crf=18) as writer:
        writer.write(frames)


@pytest.fixture(scope="module")
def results():
    return {name: measure(clip, seams=SEAMS) for name, clip in CLIPS.items()}


@pytest.fixture(scope="module")
def seam_mp4(tmp_path_factory):
    """The seam clip as ``seam.mp4`` with a sidecar ``seam.json`` that lists its seams."""
    path = tmp_path_factory.mktemp("videos") / "seam.mp4"
    write_mp4(path, CLIPS["seam"])
    path.with_suffix(".json").write_text(json.dumps({"longvid_sidecar": 1, "seed": 0, "seams": SEAMS}))
    return path


# -- each metric against the smooth pan ---------------------------------------------------------------------


def test_result_layout(results):
    r = results["pan"]
    assert r["frames"] == F and r["fps"] is None and r["size"] == [W, H] == r["analysed_size"]
    assert all(key in r for key in SCALAR_METRICS) and r["seams"] == SEAMS and r["notes"] == []
    assert all(isinstance(r[key], float) for key in SCALAR_METRICS if key != "repetition_lag")


def test_frame_difference_and_vbench_flicker(results):
    pan, frozen = results["pan"], results["frozen"]
    assert 0.02 < pan["mafd"] < 0.08  # a 1 px step of a fine texture: ~11 grey levels
    assert frozen["mafd"] == 0.0 and frozen["vbench_flicker"] == 1.0
    for r in results.values():
        assert r["vbench_flicker"] == pytest.approx(1 - r["mafd"])
    assert results["flicker"]["mafd"] > 2 * pan["mafd"]


def test_flicker_2nd_measures_the_brightness_alternation(results):
    mean_luma = float(CLIPS["pan"].astype(float).mean()) / 255
    # odd frames at 0.8×: every second difference of the global luma is 2 × 0.2 × mean luma
    assert results["flicker"]["flicker_2nd"] == pytest.approx(2 * 0.2 * mean_luma, rel=0.05)
    assert results["pan"]["flicker_2nd"] < 1e-3
    assert results["frozen"]["flicker_2nd"] == 0.0


def test_spike_and_seam_score_find_the_jumps(results):
    pan, seam = results["pan"], results["seam"]
    assert 1.0 <= pan["mafd_spike"] < 1.1 and 0.9 < pan["seam_score"] < 1.1
    assert 3 < seam["mafd_spike"] < 7 and 3 < seam["seam_score"] < 7  # a 13 px jump against 1 px steps
    assert results["frozen"]["mafd_spike"] == 1.0 and results["frozen"]["seam_score"] == 1.0
    assert measure(CLIPS["seam"], seams=None)["seam_score"] is None
    assert measure(CLIPS["seam"], seams=[0, 999])["seam_score"] is None  # no transition t-1 -> t inside
    # seams elsewhere than the jumps find nothing
    assert 0.5 < measure(CLIPS["seam"], seams=[8, 24, 40])["seam_score"] < 1.1


def test_temporal_hf_ratio(results):
    pan, flicker = results["pan"], results["flicker"]
    assert pan["temporal_hf_ratio"] < 0.03
    assert flicker["temporal_hf_ratio"] > 0.15 and flicker["temporal_hf_ratio"] > 10 * pan["temporal_hf_ratio"]
    assert results["frozen"]["temporal_hf_ratio"] == 0.0
    assert results["blur"]["temporal_hf_ratio"] < 0.03  # a slow change is no flicker


def test_warp_error_and_flow_magnitude(results):
    pan, flicker, frozen = results["pan"], results["flicker"], results["frozen"]
    assert pan["flow_mag"] == pytest.approx(1.0, abs=0.05)  # the pan's 1 px per frame
    assert frozen["flow_mag"] < 0.01
    assert pan["warp_error"] < 1e-3 and frozen["warp_error"] < 1e-3
    assert 0.08 < flicker["warp_error"] < 0.12  # the flow is right, the 20 % brightness change is what is left
    assert 0.002 < results["seam"]["warp_error"] < 0.05


def test_sharpness_drift(results):
    assert 0.9 < results["pan"]["sharpness_drift"] < 1.1
    assert 0.25 < results["blur"]["sharpness_drift"] < 0.5  # the last frames are 5×5-box blurred
    assert results["frozen"]["sharpness_drift"] == 1.0


def test_color_drift(results):
    pan, color = results["pan"], results["color"]
    assert pan["color_drift"] < 0.05 and color["color_drift"] > 0.3
    assert results["frozen"]["color_drift"] == 0.0
    distances = [d["distance"] for d in pan["color_drift_by_distance"]]
    assert distances == [1, 2, 4, 8, 16, 32]
    pan_chi2 = [d["chi2"] for d in pan["color_drift_by_distance"]]
    color_chi2 = [d["chi2"] for d in color["color_drift_by_distance"]]
    assert pan_chi2 == sorted(pan_chi2) and color_chi2 == sorted(color_chi2)  # farther apart, less alike
    assert color_chi2[-1] > 10 * pan_chi2[-1] and pan_chi2[-1] < 0.05
    flicker_chi2 = [d["chi2"] for d in results["flicker"]["color_drift_by_distance"]]
    assert flicker_chi2[0] > 10 * flicker_chi2[1]  # flicker: neighbours differ, frames two apart do not


def test_repetition_finds_the_loop_period(results):
    loop = results["loop"]
    assert loop["repetition"] > 1.3 and loop["repetition_lag"] == 16
    for name in ("pan", "flicker", "seam", "blur", "color"):
        assert results[name]["repetition"] < 0.3 and results[name]["repetition_lag"] is None, name
    # frames are standardised first: a brightness flicker is no period-2 repetition
    assert results["flicker"]["repetition"] == pytest.approx(results["pan"]["repetition"], abs=0.01)
    assert results["frozen"]["repetition"] == 0.0
    assert measure(CLIPS["loop"][:24])["repetition_lag"] is None  # the period is longer than half the clip


# -- files, sidecar seams, downscaling ------------------------------------------------------------------------


CLOSE = {"mafd": 0.05, "mafd_spike": 0.05, "seam_score": 0.05, "temporal_hf_ratio": 0.05, "flow_mag": 0.03,
         "sharpness_drift": 0.06, "vbench_flicker": 0.01}  # relative; compression adds a little noise


@pytest.mark.parametrize("max_side", [256, 64])
def test_mp4_round_trip_matches_in_memory(seam_mp4, max_side, caplog):
    """At 64 px the file is downscaled by ffmpeg and the array in numpy: the two routes agree too."""
    in_memory = measure(CLIPS["seam"], seams=SEAMS, max_side=max_side)
    from_file = measure_path(seam_mp4, max_side=max_side)  # seams from seam.json
    assert not [r for r in caplog.records if "frame size" in r.getMessage()]  # imageio-ffmpeg's resize warning
    assert from_file["path"] == str(seam_mp4) and from_file["seams"] == SEAMS
    assert from_file["frames"] == F and from_file["fps"] == 16.0 and from_file["size"] == [W, H]
    assert from_file["analysed_size"] == in_memory["analysed_size"] == ([W, H] if max_side == 256 else [64, 48])
    for key, rel in CLOSE.items():
        assert from_file[key] == pytest.approx(in_memory[key], rel=rel), key
    for key in ("warp_error", "color_drift", "repetition"):
        assert from_file[key] == pytest.approx(in_memory[key], abs=0.01), key


def test_sidecar_seams(seam_mp4, tmp_path):
    assert measure_path(seam_mp4, seams=[8])["seams"] == [8]  # explicit seams win over the sidecar
    bare = tmp_path / "bare.mp4"
    bare.write_bytes(seam_mp4.read_bytes())
    assert measure_path(bare)["seam_score"] is None  # no sidecar
    bare.with_suffix(".json").write_text(json.dumps({"longvid_sidecar": 1, "seed": 0}))
    assert measure_path(bare)["seams"] is None  # a sidecar without seams
    bare.with_suffix(".json").write_text(json.dumps({"longvid_sidecar": 1, "seams": "16,32"}))
    with pytest.raises(ValueError, match="must be a list of frame indices"):
        measure_path(bare)


def test_open_frames_downscales_by_area():
    assert fit_size(832, 480, 256) == (256, 148) and fit_size(480, 832, 256) == (148, 256)
    assert fit_size(128, 96, 256) == (128, 96)
    blocks = np.kron(np.arange(12, dtype=np.uint8).reshape(1, 3, 4, 1), np.ones((1, 2, 2, 3), np.uint8))
    with open_frames(blocks, max_side=4) as video:  # (1, 6, 8, 3) of 2×2 blocks -> (1, 3, 4, 3)
        [frame] = list(video)
    assert video.analysed_size == (4, 3) and video.size == (8, 6) and video.count == 1
    assert np.array_equal(frame[..., 0], np.arange(12).reshape(3, 4))
    frames = list(open_frames(CLIPS["pan"][:2], max_side=100))  # a 1.28× reduction: fractional footprints
    assert frames[0].shape == (75, 100, 3)
    assert abs(float(frames[0].mean()) - float(CLIPS["pan"][0].mean())) < 0.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 frames"):
        measure(CLIPS["pan"][:1])
    with pytest.raises(ValueError, match=r"uint8 frames of shape \(F, H, W, 3\)"):
        measure(CLIPS["pan"].astype(np.float32))


# -- without OpenCV ---------------------------------------------------------------------------------------


def test_without_cv2_the_flow_metrics_are_none(monkeypatch, results):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    r = measure(CLIPS["flicker"], seams=SEAMS)
    assert r["warp_error"] is None and r["flow_mag"] is None and r["notes"] == [CV2_NOTE]
    for key in SCALAR_METRICS:
        if key not in ("warp_error", "flow_mag"):
            assert r[key] == results["flicker"][key], key
    assert "warp_error, flow_mag need OpenCV" in render_table([r]).caption


# -- many paths and the table ---------------------------------------------------------------------------------


def test_measure_paths_expands_folders(seam_mp4, tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in ("b.mp4", "a.mp4"):
        (folder / name).write_bytes(seam_mp4.read_bytes())
    (folder / "a.json").write_text(json.dumps({"longvid_sidecar": 1, "seams": SEAMS}))
    (folder / "notes.txt").write_text("not a video")
    results = measure_paths([str(folder), str(seam_mp4)])
    assert [r["path"] for r in results] == [str(folder / "a.mp4"), str(folder / "b.mp4"), str(seam_mp4)]
    assert results[0]["seam_score"] > 3 and results[1]["seam_score"] is None
    assert results[0]["mafd"] == results[1]["mafd"] == results[2]["mafd"]


def test_measure_paths_errors_name_the_path_and_the_fix(tmp_path, seam_mp4):
    with pytest.raises(RecipeError) as err:
        measure_paths([str(tmp_path / "missing.mp4")])
    message = str(err.value)
    assert "\n" not in message and "missing.mp4 does not exist" in message and "pass a video file" in message
    with pytest.raises(RecipeError, match="holds no .mp4 files"):
        measure_paths([str(tmp_path)])
    fake = tmp_path / "fake.mp4"
    fake.write_text("hello")
    with pytest.raises(RecipeError) as err:
        measure_paths([str(fake)])
    message = str(err.value)
    assert "\n" not in message and f"cannot decode {fake} as a video" in message
    assert isinstance(err.value.__cause__, VideoReadError)
    video = tmp_path / "v.mp4"
    video.write_bytes(seam_mp4.read_bytes())
    video.with_suffix(".json").write_text(json.dumps({"longvid_sidecar": 1, "seams": [16.5]}))
    with pytest.raises(RecipeError, match=r"v\.mp4: .*\"seams\" must be a list of frame indices"):
        measure_paths([str(video)])


def rendered_columns(table) -> dict[str, dict[str, str]]:
    """The table as printed: {video header: {metric: cell text}}."""
    console = Console(file=io.StringIO(), width=400)
    console.print(table)
    headers = [c.header for c in table.columns]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in console.file.getvalue().splitlines()
            if line.startswith("│")]
    return {h: {row[0]: row[i] for row in rows} for i, h in enumerate(headers) if i}


def test_render_table(results):
    rows = [{"path": "out/pan.mp4", **results["pan"], "fps": 16.0}, {"path": "out/loop.mp4", **results["loop"]}]
    table = render_table(rows)
    assert [c.header for c in table.columns] == ["metric", "pan.mp4", "loop.mp4"]
    assert table.caption is None
    columns = rendered_columns(table)
    pan, loop = columns["pan.mp4"], columns["loop.mp4"]
    assert list(pan) == ["frames", "fps", "size", *SCALAR_METRICS]
    assert pan["frames"] == "64" and pan["fps"] == "16" and pan["size"] == "128×96"
    assert pan["mafd"] == f"{results['pan']['mafd']:.3g}" and len(pan["mafd"].lstrip("0.")) == 3  # 3 digits
    assert pan["repetition_lag"] == "–" and loop["repetition_lag"] == "16" and loop["fps"] == "–"
    assert loop["repetition"] == f"{results['loop']['repetition']:.3g}"


def test_the_metrics_command_prints_the_table_and_the_json(seam_mp4):
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "longvid", "metrics", str(seam_mp4.parent)]
    as_json = subprocess.run([*run, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    [result] = json.loads(as_json.stdout)
    assert result == json.loads(json.dumps(measure_path(seam_mp4)))
    table = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    row = next(line for line in table.stdout.splitlines() if line.startswith("│ seam_score"))
    assert row.split("│")[2].strip() == f"{result['seam_score']:.3g}"
    bad = subprocess.run([*run[:-1], str(seam_mp4.parent / "missing.mp4")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "missing.mp4" in bad.stderr
