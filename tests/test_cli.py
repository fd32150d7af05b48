"""The ``longvid`` command line through Typer's CliRunner (and a subprocess where imports matter)."""

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from longvid import registry
from longvid.cli import app
from longvid.errors import ModelLoadError, RecipeError
from longvid.recipe.recipes import builtin_recipes
from longvid.recipe.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]
#: demo at a few frames and pixels, 2 steps: a whole generation in well under a second
SMALL = ["sampler.steps=2", "video.num_frames=5", "video.height=32", "video.width=48"]
AD = ["model.family=animatediff", "model.path=tiny:animatediff"]

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def read_mp4(path):
    """(frames uint8 (F, H, W, 3), metadata) read back with imageio-ffmpeg."""
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(gen)
    w, h = meta["size"]
    frames = np.stack([np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen])
    return frames, meta


# ------------------------------------------------------------------------------------------------- show


def test_show_prints_the_resolved_recipe_with_the_override():
    result = invoke("show", "demo", "sampler.steps=3", "video.num_frames=33")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert data["sampler"]["steps"] == 3
    assert data["video"]["num_frames"] == 33
    assert data["name"] == "demo"
    assert data["sampler"]["max_sequence_length"] == 32  # from the recipe YAML
    assert resolve(data) == resolve("demo", ["sampler.steps=3", "video.num_frames=33"])


def test_show_prints_prompts_verbatim(tmp_path):
    """Markup-like ``[x]`` and emoji codes in user text come out unchanged."""
    prompt = "A cat: running # 007 [x] yes [bold]big[/bold] :fire:"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": {"family": "wan", "path": "tiny:wan"}, "prompt": prompt}))
    result = invoke("show", path)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["prompt"] == prompt


@pytest.mark.parametrize("args", [["show", "demo", "sampler.steps=3"], ["validate", "configs/"], ["recipes"],
                                  ["models"], ["methods"]], ids=lambda a: a[0])
def test_light_commands_do_not_import_torch(args):
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from longvid.cli import app\n"
            "r = CliRunner().invoke(app, sys.argv[1:])\n"
            "assert r.exit_code == 0, r.output\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
            "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


# --------------------------------------------------------------------------------------------- validate


def test_validate_shipped_configs():
    result = invoke("validate", ROOT / "configs")
    assert result.exit_code == 0, result.output
    count = len([p for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".yml")])
    assert result.stdout.strip().splitlines()[-1] == f"{count} valid, 0 invalid"
    assert f"ok       {ROOT / 'configs' / 'demo.yaml'}" in result.stdout


def test_validate_lists_the_bad_file(tmp_path):
    (tmp_path / "sub").mkdir()
    good = tmp_path / "good.yaml"
    good.write_text("model: {family: wan, path: 'tiny:wan'}\n")
    bad = tmp_path / "sub" / "bad.yaml"
    bad.write_text("model: {family: wan, path: 'tiny:wan'}\nvideo: {num_frames: 32}\n")
    (tmp_path / "notes.txt").write_text("not a recipe")
    result = invoke("validate", tmp_path)
    assert result.exit_code == 2
    lines = result.stdout.strip().splitlines()
    assert f"ok       {good}" in lines
    assert f"invalid  {bad}: video.num_frames: wan needs 4k+1 frames, got 32 (nearest: 29 or 33)" in lines
    assert lines[-1] == "1 valid, 1 invalid"


def test_validate_missing_path():
    result = invoke("validate", "/nonexistent/recipes")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: paths: no such file or folder: /nonexistent/recipes"


# ------------------------------------------------------------------------------------------ listings


def test_recipes_lists_every_builtin():
    result = invoke("recipes")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.strip().splitlines()]
    assert names == list(builtin_recipes())
    assert "demo" in names


def test_models_lists_the_families_and_their_tiny_models():
    result = invoke("models")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines if not line.startswith(" ")] == ["wan", "animatediff", "pyramid_flow"]
    tiny = [line.split("tiny models: ")[1].split("  ")[0] for line in lines if "tiny models:" in line]
    assert tiny == ["tiny:wan, tiny:wan2.2-a14b, tiny:wan2.2-ti2v", "tiny:animatediff", "tiny:pyramid-flow"]
    assert "model.path=tiny:pyramid-flow)" in result.stdout  # the example names a real tiny model


def test_version():
    from longvid import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"longvid {__version__}"


def test_methods_lists_the_registered_methods():
    result = invoke("methods")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    if not registry.METHODS:
        assert lines == ["no methods registered"]
    else:
        assert [line.split()[0] for line in lines] == list(registry.METHODS)
        for line, name in zip(lines, registry.METHODS):
            families = sorted(registry.method_class(name).families)
            assert line.endswith(f"[{', '.join(families)}]")


def test_doctor_prints_versions():
    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.strip().splitlines()}
    assert rows["torch"] == torch.__version__
    assert rows["diffusers"] == metadata.version("diffusers")
    assert Path(rows["ffmpeg_exe"]).is_file()


# ---------------------------------------------------------------------------------------------- dry run


@pytest.mark.parametrize("overrides, shape", [
    ([], "(1, 16, 5, 8, 12)"),
    (["video.num_frames=33"], "(1, 16, 9, 8, 12)"),
    ([*AD, "video.num_frames=16"], "(1, 4, 16, 8, 12)"),
])
def test_dry_run_prints_the_latent_shape_and_writes_nothing(tmp_path, overrides, shape):
    out = tmp_path / "out"
    result = invoke("generate", "--recipe", "demo", *overrides, "--dry-run", "--out", out)
    assert result.exit_code == 0, result.output
    *recipe_lines, summary = result.stdout.strip().splitlines()
    assert summary.startswith(f"# latent shape {shape};")
    assert yaml.safe_load("\n".join(recipe_lines))["output"]["dir"] == str(out)
    assert not out.exists()


# ------------------------------------------------------------------------------------------- bad inputs


BAD_YAML = "model: [unclosed\n  family: wan\n"
NO_PATH = "model: {family: wan}\n"

BAD = {
    "unknown recipe": (["--recipe", "demoo"], "did you mean 'demo'?"),
    "recipe name with brackets": (["--recipe", "x[red]y"], "no built-in recipe 'x[red]y'"),
    "invalid yaml": (["--recipe", "{bad_yaml}"], "not valid YAML"),
    "missing model.path": (["--recipe", "{no_path}"], "model.path: required"),
    "unknown key": (["--recipe", "demo", "video.num_frame=33"], "did you mean 'num_frames'?"),
    "bad literal": (["--recipe", "demo", "runtime.offload=foo"], "expected one of ['none', 'model', 'sequential', 'group']"),
    "not key=value": (["--recipe", "demo", "steps"], "expected key=value"),
    "wan frames": (["--recipe", "demo", "video.num_frames=32"], "video.num_frames: wan needs 4k+1 frames, got 32 "
                                                                "(nearest: 29 or 33)"),
    "wan height": (["--recipe", "demo", "video.height=100"], "video.height: wan needs a multiple of 16"),
    "animatediff width": (["--recipe", "demo", *AD, "video.width=100"],
                          "video.width: animatediff needs a multiple of 8, got 100 (nearest: 96 or 104; generate 104 "
                          "and set output.crop=[64,100] for the exact size)"),
    "animatediff 48 frames": (["--recipe", "demo", *AD, "video.num_frames=48"], "limit of 32; add a long-video "
                                                                               "method"),
    "tiny family mismatch": (["--recipe", "demo", "model.path=tiny:animatediff"], "model.family is wan"),
    "prompt as key=value": (["--recipe", "demo", "prompt=a cat"], "prompt: free text cannot be set with key=value"),
    "negative as key=value": (["--recipe", "demo", "negative_prompt=x"], "use --negative-prompt"),
    "prompt and prompt-at": (["--recipe", "demo", "--prompt", "a", "--prompt-at", "0:b"], "not both"),
    "bad prompt-at": (["--recipe", "demo", "--prompt-at", "first:a lake"], "expected FRAME:TEXT"),
    "missing model folder": (["--recipe", "demo", "model.path=/nonexistent/longvid-model"],
                             "model.path: no folder '/nonexistent/longvid-model'"),
    "uncached hub id": (["--recipe", "demo", "model.path=longvid-test/not-cached-model"],
                        "hf download longvid-test/not-cached-model"),
}


def _bad_args(case, tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "no_path.yaml").write_text(NO_PATH)
    args, fragment = BAD[case]
    args = [a.format(bad_yaml=tmp_path / "bad.yaml", no_path=tmp_path / "no_path.yaml") for a in args]
    return ["generate", *args, "--out", tmp_path / "out", "--quiet"], fragment


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    args, fragment = _bad_args(case, tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert not any((tmp_path / "out").glob("*.mp4"))


@pytest.mark.parametrize("case, error", [("wan frames", RecipeError), ("missing model folder", ModelLoadError)])
def test_longvid_debug_lets_the_exception_through(case, error, tmp_path):
    args, fragment = _bad_args(case, tmp_path)
    result = invoke(*args, env={"LONGVID_DEBUG": "1"})
    assert isinstance(result.exception, error)
    assert fragment in str(result.exception)
    assert result.exit_code == 1


# ---------------------------------------------------------------------------------------------- generate


def test_generate_writes_mp4_and_sidecar_and_respects_overwrite(tmp_path):
    prompt = "a fox: 007 # [x]"
    args = ["generate", "--recipe", "demo", *SMALL, "--out", tmp_path, "--seed", "7", "--prompt", prompt]
    first = invoke(*args, "--quiet")
    assert first.exit_code == 0, first.output
    assert first.stdout == ""
    files = sorted(tmp_path.iterdir())
    assert [p.suffix for p in files] == [".json", ".mp4"]
    assert files[0].stem == files[1].stem and files[1].stem.startswith("demo-a-fox-007")
    mp4, side = files[1], files[0]
    frames, meta = read_mp4(mp4)
    assert frames.shape == (5, 32, 48, 3)
    assert meta["fps"] == 8
    sidecar = json.loads(side.read_text())
    assert sidecar["output"] == str(mp4)
    assert (sidecar["recipe"]["prompt"], sidecar["seed"], sidecar["recipe"]["sampler"]["steps"]) == (prompt, 7, 2)
    before = (mp4.read_bytes(), side.read_text())

    again = invoke(*args, "--quiet")
    assert again.exit_code == 2
    assert again.stderr.strip() == f"error: {mp4} already exists; pass --overwrite (overwrite=True in Python) to replace it"
    assert (mp4.read_bytes(), side.read_text()) == before

    forced = invoke(*args, "--overwrite", "--json")
    assert forced.exit_code == 0, forced.output
    printed = json.loads(forced.stdout)  # stdout holds the sidecar and nothing else
    assert printed["longvid_sidecar"] == 1
    assert printed["output"] == str(mp4)
    assert printed["recipe"]["output"]["overwrite"] is True
    assert printed == json.loads(side.read_text())
    assert np.array_equal(read_mp4(mp4)[0], frames)  # same recipe and seed: the same video
    assert sorted(tmp_path.iterdir()) == files  # nothing else (no temporary files) left behind


def test_generate_with_progress_reports_the_file(tmp_path):
    result = invoke("generate", "--recipe", "demo", *SMALL, "--out", tmp_path, "--name", "clip")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"wrote {tmp_path / 'clip.mp4'} (5 frames" in result.stderr
    assert "random-weight demo model" in result.stderr
    assert (tmp_path / "clip.mp4").is_file() and (tmp_path / "clip.json").is_file()
