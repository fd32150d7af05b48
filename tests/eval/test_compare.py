"""``longvid compare`` on tiny-model outputs: the report's files and values, one model load for recipes that share
it, reuse on a rerun, existing videos and batch folders, one-line refusals; and the page in headless Chromium:
it loads, every video plays, the players advance together and seek together, the tables are filled."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from longvid.eval.compare import SHEET_FRAMES, labels_for
from longvid.eval.frames import open_frames
from longvid.eval.metrics import measure_path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["model.path=tiny:wan", "video.num_frames=33", "video.height=32", "video.width=48", "sampler.steps=2"]


def _longvid(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longvid", *args], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=timeout)


def _frames(path: Path) -> np.ndarray:
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    proc = _longvid("compare", "--recipes", "freenoise-wan-4x,freelong-wan-4x", *TINY, "video.num_frames=97",
                    "--prompt", 'a fox <img src=x onerror="alert(1)">', "--seed", "7", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def test_the_report_holds_the_videos_metrics_sheets_and_stack(report):
    out, said = report
    assert "freenoise-wan-4x: made" in said and "freelong-wan-4x: made" in said
    data = json.loads((out / "metrics.json").read_text())
    labels = [v["label"] for v in data["videos"]]
    assert labels == ["freenoise-wan-4x", "freelong-wan-4x"]
    videos = [out / "videos" / f"{label}.mp4" for label in labels]
    for v, path in zip(data["videos"], videos):
        assert v["metrics"] == json.loads(json.dumps({**measure_path(path), "path": v["metrics"]["path"]}))
        assert v["recipe"]["prompt"] == 'a fox <img src=x onerror="alert(1)">' and v["recipe"]["seed"] == 7
        assert v["timings"]["total_s"] > 0 and v["peak_memory"]["peak_rss_bytes"] > 0
        assert len(v["per_frame"]["luma"]) == 97
    # FreeNoise at 97 frames (25 latent): windows of 21 latent frames, (0, 21) and the tail (4, 25): bounds 4 and
    # 21, pixel frames 13 and 81; FreeLong has no hard window
    assert data["videos"][0]["metrics"]["seams"] == [13, 81] and data["videos"][0]["metrics"]["seam_score"] > 0
    assert data["videos"][1]["metrics"]["seams"] == [] and data["videos"][1]["metrics"]["seam_score"] is None
    # the methods act beyond the native 81 frames: the two videos differ
    a, b = (_frames(p) for p in videos)
    assert a.shape == b.shape == (97, 32, 48, 3) and np.abs(a.astype(int) - b).mean() > 0.5
    # the stack: both videos left to right, frame for frame (within the encoder's loss)
    stack = _frames(out / "side-by-side.mp4")
    assert stack.shape == (97, 32, 96, 3)
    assert np.abs(stack[:, :, :48].astype(int) - a).mean() < 3 and np.abs(stack[:, :, 48:].astype(int) - b).mean() < 3
    # the contact sheet: every 12th frame (97 // 8), 4 per row, 4-px gaps; its first tile is frame 0
    sheet = _frames(out / "sheets" / "freenoise-wan-4x.png")[0]
    assert sheet.shape == (2 * 32 + 4, 4 * 48 + 3 * 4, 3) and SHEET_FRAMES == 8
    with open_frames(videos[0], max_side=192) as frames:
        picked = [f for i, f in enumerate(frames) if i % 12 == 0][:8]
    assert np.array_equal(sheet[:32, :48], picked[0]) and np.array_equal(sheet[36:68, 52 * 3:52 * 3 + 48], picked[7])
    assert (out / "plots" / "per-frame.png").stat().st_size > 1000


def test_the_page_escapes_user_text_and_needs_nothing_online(report):
    out, _ = report
    page = (out / "index.html").read_text()
    assert '<img src=x onerror="alert(1)">' not in page
    assert "a fox &lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # no CDN, no remote resource
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert (out / ref).is_file(), ref


def test_a_rerun_reuses_the_videos_and_existing_videos_compare_too(report, tmp_path):
    out, _ = report
    before = {p.name: p.stat().st_mtime_ns for p in (out / "videos").glob("*.mp4")}
    proc = _longvid("compare", "--recipes", "freenoise-wan-4x,freelong-wan-4x", *TINY, "video.num_frames=97",
                    "--prompt", 'a fox <img src=x onerror="alert(1)">', "--seed", "7", "--out", str(out))
    assert proc.returncode == 0 and proc.stderr.count("reused") == 2, proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "videos").glob("*.mp4")} == before
    other = _longvid("compare", "--videos", f"{out / 'videos'}", "--out", str(tmp_path / "again"))
    assert other.returncode == 0, other.stderr
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    # the seams come with the videos' own sidecars, although the copies in the report have none beside them
    assert again["videos"][1]["metrics"]["seams"] == [13, 81]
    assert again["videos"][1]["metrics"]["seam_score"] == json.loads((out / "metrics.json").read_text())[
        "videos"][0]["metrics"]["seam_score"]
    assert [v["label"] for v in again["videos"]] == ["freelong-wan-4x.mp4", "freenoise-wan-4x.mp4"]
    assert (tmp_path / "again" / "videos" / "freelong-wan-4x.mp4.mp4").read_bytes() == \
        (out / "videos" / "freelong-wan-4x.mp4").read_bytes()


@pytest.mark.parametrize("args, key", [
    ([], "--recipes"),
    (["--recipes", "demo", "--videos", "x.mp4"], "--recipes"),
    (["--videos", "missing.mp4"], "path"),
    (["--videos", "somewhere/", "--seed", "3"], "--videos"),
    (["--recipes", "demo,no-such-recipe"], "no-such-recipe"),
    (["--recipes", "demo,freelong-wan-4x", "video.num_frames=10"], "video.num_frames"),
])
def test_bad_requests_are_one_line_before_any_work(args, key, tmp_path):
    proc = _longvid("compare", *args, "--out", str(tmp_path / "cmp"), timeout=60)
    assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "cmp").exists()


def test_labels_are_file_safe_and_unique():
    assert labels_for(["freelong-wan-4x", "./my recipe.yaml", "a/b/freelong-wan-4x", "../x.mp4", "<>"]) == [
        "freelong-wan-4x", "my-recipe", "freelong-wan-4x-2", "x.mp4", "video"]


# ------------------------------------------------------------------------------------------ in a real browser

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

# Appended to a copy of the page: drive the page's own controls like a user, then write what happened.
PROBE = """
<script>
const result = document.createElement('pre'); result.id = 'probe'; document.body.appendChild(result);
const all = Array.from(document.querySelectorAll('video'));
const ready = Promise.all(all.map(v => v.readyState >= 1 ? 1 : new Promise(r => v.addEventListener('loadedmetadata', r))));
const wait = ms => new Promise(r => setTimeout(r, ms));
ready.then(async () => {
  const out = {durations: all.map(v => v.duration)};
  document.getElementById('play').click();
  await wait(1000);
  out.playing = all.map(v => !v.paused);
  out.after_play = all.map(v => v.currentTime);
  document.getElementById('play').click();
  out.paused = all.map(v => v.paused);
  const seek = document.getElementById('seek');
  seek.value = 500; seek.dispatchEvent(new Event('input'));
  await wait(300);
  out.after_seek = all.map(v => v.currentTime);
  out.cells = Array.from(document.querySelectorAll('#metrics td, #costs td')).map(td => td.textContent.trim());
  out.errors = all.map(v => v.error ? v.error.code : 0);
  result.textContent = JSON.stringify(out);
});
</script>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (CI installs the OS package)")
def test_the_page_plays_the_videos_together_in_headless_chromium(report):
    out, _ = report
    probe = out / "probe.html"
    probe.write_text((out / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--mute-audio",
                           "--autoplay-policy=no-user-gesture-required", "--virtual-time-budget=15000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["errors"] == [0, 0] and all(d == pytest.approx(97 / 16, abs=0.1) for d in result["durations"])
    assert result["playing"] == [True, True] and result["paused"] == [True, True]
    t0, t1 = result["after_play"]
    assert t0 > 0.1 and abs(t0 - t1) < 0.3  # both advanced, together (loose: a loaded CI machine plays unevenly)
    half = 97 / 16 / 2
    assert all(abs(t - half) < 0.05 for t in result["after_seek"])  # the slider moved both to the middle
    assert result["cells"] and all(c for c in result["cells"])  # every table cell filled ("–" where no value)


def test_output_preview_writes_a_contact_sheet_beside_the_video(tmp_path):
    from longvid import runner
    from longvid.errors import OutputExistsError
    from longvid.recipe.resolve import resolve

    recipe = resolve("demo", [*TINY, "output.preview=true", f"output.dir={tmp_path}"], {"output.name": "fox"})
    result = runner.generate(recipe)
    sheet = _frames(tmp_path / "fox.preview.png")[0]
    assert sheet.shape == (2 * 32 + 4, 4 * 48 + 3 * 4, 3)  # 33 frames: every 4th, 8 of them
    with open_frames(result.path, max_side=192) as frames:
        picked = [f for i, f in enumerate(frames) if i % 4 == 0][:8]
    assert np.array_equal(sheet[:32, :48], picked[0]) and np.array_equal(sheet[36:, 156:204], picked[7])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.json", "fox.mp4", "fox.preview.png"]
    # an existing preview is refused before any work, like the video and its sidecar
    (tmp_path / "fox.mp4").unlink()
    (tmp_path / "fox.json").unlink()
    with pytest.raises(OutputExistsError, match="fox.preview.png"):
        runner.generate(recipe)
    without = resolve("demo", [*TINY, f"output.dir={tmp_path / 'b'}"], {"output.name": "fox"})
    runner.generate(without)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["fox.json", "fox.mp4"]


def test_a_foreign_or_broken_json_beside_a_video_is_not_a_sidecar(report, tmp_path):
    from longvid.errors import RecipeError
    from longvid.eval.compare import entries_for
    from longvid.eval.report import measure_paths

    out, _ = report
    video = tmp_path / "clip.mp4"
    shutil.copyfile(out / "videos" / "freelong-wan-4x.mp4", video)
    for text in ['{"recipe": "x", "seams": "y"}', "[1, 2]", "{not json"]:  # not longvid's: no sidecar at all
        video.with_suffix(".json").write_text(text)
        [entry] = entries_for([video])
        assert entry.sidecar == {} and measure_paths([str(video)])[0]["seam_score"] is None
    # longvid's, with wrong types: the page keeps only what has the expected type; metrics names the file
    video.with_suffix(".json").write_text('{"longvid_sidecar": 1, "recipe": [1], "seed": 7, "seams": "z"}')
    [entry] = entries_for([video])
    assert entry.sidecar == {"seed": 7}
    with pytest.raises(RecipeError, match='clip.json: "seams" must be a list'):
        measure_paths([str(video)])
    proc = _longvid("compare", "--videos", str(video), "--out", str(tmp_path / "cmp"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    [shown] = json.loads((tmp_path / "cmp" / "metrics.json").read_text())["videos"]
    assert shown["recipe"] is None and shown["metrics"]["seam_score"] is None


def test_an_unreadable_video_is_refused_before_anything_is_written(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    proc = _longvid("compare", "--videos", str(junk), "--out", str(tmp_path / "cmp"), timeout=60)
    assert proc.returncode == 2 and "--videos" in proc.stderr and "junk.mp4" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "cmp").exists()
