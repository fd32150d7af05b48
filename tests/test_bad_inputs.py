"""Every bad input is refused before any work: exit 2, one ``error:`` line per problem naming the key, no
traceback, no file (and no empty folder) left behind, and no model loaded.

The table is the user's view: the command line as typed. ``{tmp}`` is a scratch folder holding the files of
``FILES`` (recipes, sidecars, a plain file, a folder). docs/reliability.md records the count.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longvid import runner as longvid_runner
from longvid.cli import app

G = ["generate", "--recipe", "demo"]
AD = ["model.family=animatediff", "model.path=tiny:animatediff"]

SIDECAR = {"longvid_sidecar": 1, "output": "x.mp4", "recipe": {"model": {"family": "wan", "path": "tiny:wan"},
                                                               "prompt": "a fox"}}

FILES = {
    "broken.yaml": "model: [unclosed\n  family: wan\n",
    "list.yaml": "- a\n- b\n",
    "scalar.yaml": "just words\n",
    "empty.yaml": "",
    "python.yaml": "model: !!python/object/apply:os.system ['echo pwned']\n",
    "dupkeys.yaml": "seed: 1\nseed: 2\nmodel: {family: wan, path: 'tiny:wan'}\n",
    "interp.yaml": "model: {family: wan, path: 'tiny:wan'}\nvideo: {width: '${oc.env:HOME}'}\n",
    "textnum.yaml": "model: {family: wan, path: 'tiny:wan'}\nprompt: 007\n",
    "nomodel.yaml": "video: {num_frames: 9}\n",
    "badsection.yaml": "model: {family: wan, path: 'tiny:wan'}\nvideo: 5\n",
    "other.json": json.dumps({"name": "not ours", "items": [1, 2]}),
    "norecipe.json": json.dumps({"longvid_sidecar": 1, "output": "x.mp4"}),
    "listrecipe.json": json.dumps({"longvid_sidecar": 1, "recipe": [1, 2]}),
    "badtypes.json": json.dumps({**SIDECAR, "recipe": {**SIDECAR["recipe"], "video": {"num_frames": "many"}}}),
    "binary.yaml": b"\x00\xff\xfe\x89PNG\r\n",
    "twokeys.yaml": "model: {family: wan, path: 'tiny:wan'}\nprompt: {0: a, '0': b}\nmethods: {freenoise: {}}\n",
    "afile": "not a folder\n",
}

#: id -> (arguments after ``longvid``, text the single error line must contain)
CASES = {
    # --- finding the recipe
    "unknown recipe": (["generate", "--recipe", "demoo"], "recipe: no built-in recipe 'demoo'"),
    "path falls back": (["generate", "--recipe", "/no/such/dir/demo.yaml"], "recipe: '/no/such/dir/demo.yaml' does not exist"),
    "yaml suffix is a path": (["generate", "--recipe", "demo.yaml"], "the built-in recipe is --recipe demo"),
    "folder as recipe": (["generate", "--recipe", "{tmp}"], "is a folder, not a recipe file"),
    "broken yaml": (["generate", "--recipe", "{tmp}/broken.yaml"], "not valid YAML"),
    "list yaml": (["generate", "--recipe", "{tmp}/list.yaml"], "must be a YAML mapping"),
    "scalar yaml": (["generate", "--recipe", "{tmp}/scalar.yaml"], "just words: unknown key"),
    "empty yaml": (["generate", "--recipe", "{tmp}/empty.yaml"], "model.family: required"),
    "python tag": (["generate", "--recipe", "{tmp}/python.yaml"], "not valid YAML"),
    "duplicate keys": (["generate", "--recipe", "{tmp}/dupkeys.yaml"], "not valid YAML"),
    "binary file": (["generate", "--recipe", "{tmp}/binary.yaml"], "not valid YAML"),
    "interpolation in yaml": (["generate", "--recipe", "{tmp}/interp.yaml"], "video.width: '${oc.env:HOME}' is an interpolation"),
    "number as prompt": (["generate", "--recipe", "{tmp}/textnum.yaml"], "prompt: expected text, got int 7"),
    "no model": (["generate", "--recipe", "{tmp}/nomodel.yaml"], "model.family: required"),
    "section not a mapping": (["generate", "--recipe", "{tmp}/badsection.yaml"], "video: expected a mapping"),
    "another tool's json": (["generate", "--recipe", "{tmp}/other.json"], "not a longvid sidecar"),
    "sidecar without recipe": (["generate", "--recipe", "{tmp}/norecipe.json"], "recipe: this sidecar holds no recipe"),
    "sidecar recipe is a list": (["generate", "--recipe", "{tmp}/listrecipe.json"], "recipe: this sidecar holds no recipe"),
    "sidecar wrong types": (["generate", "--recipe", "{tmp}/badtypes.json"], "video.num_frames"),
    # --- overrides
    "not key=value": ([*G, "steps"], "expected key=value"),
    "empty key": ([*G, "=3"], "expected key=value"),
    "unknown key": ([*G, "video.num_frame=33"], "did you mean 'num_frames'?"),
    "unknown section": ([*G, "vidoe.num_frames=33"], "vidoe: unknown key"),
    "not a number": ([*G, "sampler.steps=abc"], "sampler.steps"),
    "steps null": ([*G, "sampler.steps=null"], "sampler.steps: must be set"),
    "frames null": ([*G, "video.num_frames=null"], "video.num_frames: must be set"),
    "fps null": ([*G, "video.fps=null"], "video.fps: must be set"),
    "steps 0": ([*G, "sampler.steps=0"], "sampler.steps: must be at least 1"),
    "steps float": ([*G, "sampler.steps=1.5"], "sampler.steps"),
    "steps huge": ([*G, "sampler.steps=100000"], "above longvid's limit of 1000"),
    "frames 0": ([*G, "video.num_frames=0"], "video.num_frames: must be at least 1"),
    "wan frames": ([*G, "video.num_frames=32"], "nearest: 29 or 33"),
    "frames huge": ([*G, "video.num_frames=100001"], "video.num_frames: 100001 is above longvid's limit"),
    "height not multiple": ([*G, "video.height=100"], "video.height: wan needs a multiple of 16"),
    "width negative": ([*G, "video.width=-16"], "video.width"),
    "width huge": ([*G, "video.width=65536"], "video.width: 65536 is above longvid's limit"),
    "fps 0": ([*G, "video.fps=0"], "video.fps: must be positive"),
    "guidance negative": ([*G, "sampler.guidance_scale=-1"], "sampler.guidance_scale: must be >= 0"),
    "eta 2": ([*G, "sampler.eta=2"], "sampler.eta: must be in [0, 1]"),
    "text length 0": ([*G, "sampler.max_sequence_length=0"], "sampler.max_sequence_length: must be positive"),
    "seed negative": ([*G, "seed=-1"], "seed: must be >= 0"),
    "seed too big": ([*G, "seed=99999999999999999999999"], "seed: must be at most 2**64-1"),
    "crf 60": ([*G, "output.crf=60"], "output.crf: must be in [0, 51]"),
    "codec": ([*G, "output.codec=h264"], "output.codec"),
    "preset": ([*G, "output.preset=fastest"], "output.preset: unknown libx264 preset 'fastest'"),
    "encoder threads": ([*G, "output.threads=0"], "output.threads: must be in [1, 64]"),
    "device mps": ([*G, "runtime.device=mps"], "runtime.device: expected auto, cpu, cuda or cuda:N"),
    "device nonsense": ([*G, "runtime.device=gpu0"], "runtime.device"),
    "threads 0": ([*G, "runtime.threads=0"], "runtime.threads: must be at least 1"),
    "decode chunk 0": ([*G, "runtime.decode_chunk=0"], "runtime.decode_chunk: must be at least 1"),
    "offload": ([*G, "runtime.offload=disk"], "runtime.offload"),
    "checkpoint mode": ([*G, "runtime.checkpoint=sometimes"], "runtime.checkpoint"),
    "checkpoint every 0": ([*G, "runtime.checkpoint_every=0"], "runtime.checkpoint_every: must be at least 1"),
    "dtype": ([*G, "model.dtype=fp8"], "model.dtype"),
    "unknown family": ([*G, "model.family=sora"], "model.family"),
    "unknown tiny": ([*G, "model.path=tiny:nope"], "model.path: no built-in tiny model 'nope'"),
    "empty model path": ([*G, "model.path=''"], "model.path: must not be empty"),
    "tiny family mismatch": ([*G, "model.path=tiny:animatediff"], "model.family is wan"),
    "scheduler class": ([*G, "sampler.scheduler=FancyScheduler"], "sampler.scheduler: 'FancyScheduler' is not a diffusers scheduler"),
    "scheduler setting": ([*G, "sampler.scheduler_config.flow_shfit=3"], "sampler.scheduler_config.flow_shfit: UniPCMultistepScheduler has no setting"),
    "flow shift on ddim": ([*G, *AD, "video.num_frames=16", "sampler.flow_shift=5"], "sampler.flow_shift: DDIMScheduler has no flow shift"),
    "interpolation override": ([*G, "model.path=${oc.env:HOME}"], "model.path: '${oc.env:HOME}' is an interpolation"),
    "prompt by key=value": ([*G, "prompt=a cat"], "prompt: free text cannot be set with key=value"),
    "name by key=value": ([*G, "output.name=x"], "output.name: a name template cannot be set with key=value"),
    # --- output names
    "name unknown field": ([*G, "--name", "{recipe}-{colour}"], "output.name: unknown field {colour}"),
    "name bad spec": ([*G, "--name", "{prompt:d}"], "output.name: name template field {prompt:d} cannot format"),
    "name unbounded width": ([*G, "--name", "{seed:0999999d}"], "output.name: {seed:0999999d} is 999999 characters wide"),
    "name index outside batch": ([*G, "--name", "{index}-{seed}"], "output.name: {index} numbers the items of a batch run"),
    "name single brace": ([*G, "--name", "{seed"], "output.name: invalid name template"),
    "name attribute access": ([*G, "--name", "{prompt.__class__}"], "output.name: unknown field {prompt.__class__}"),
    "name empty": ([*G, "--name", ""], "output.name: must not be empty"),
    # --- output place
    "out is a file": ([*G, "--out", "{tmp}/afile"], "output.dir: '{tmp}/afile' is a file"),
    "out under a file": ([*G, "--out", "{tmp}/afile/sub"], "output.dir: cannot create '{tmp}/afile/sub'"),
    "target is a folder": ([*G, "--out", "{tmp}/o", "--name", "taken"], "output.name: '{tmp}/o/taken.mp4' is a folder"),
    # --- prompts
    "prompt and prompt-at": ([*G, "--prompt", "a", "--prompt-at", "0:b"], "--prompt: use either --prompt or --prompt-at"),
    "prompt-at format": ([*G, "--prompt-at", "first:a lake"], "--prompt-at: expected FRAME:TEXT"),
    "prompt-at twice": ([*G, "--prompt-at", "0:a", "--prompt-at", "0:b", "methods.freenoise={}"], "--prompt-at: frame 0 is given twice"),
    "prompt-at without method": ([*G, "--prompt-at", "0:a", "--prompt-at", "8:b"], "prompt: a {frame: prompt} mapping needs a multi-prompt method"),
    "prompt-at past the end": ([*G, "--prompt-at", "0:a", "--prompt-at", "99:b", "methods.freenoise={}"], "prompt key 99 is beyond the last frame"),
    "prompt-at no frame 0": ([*G, "--prompt-at", "4:a", "methods.freenoise={}"], "needs a prompt at frame 0"),
    # --- methods and stages
    "unknown method": ([*G, "methods.freelog={}"], "methods.freelog: unknown method (did you mean 'freelong'?)"),
    "method not a mapping": ([*G, "methods.freelong=5"], "methods.freelong: expected a mapping"),
    "method setting range": ([*G, "methods.freelong.d_s=-1"], "methods.freelong"),
    "method unknown setting": ([*G, "methods.freelong.windw=9"], "methods.freelong.windw: unknown key"),
    "method weighting": ([*G, "methods.freenoise.weighting=triangle"], "methods.freenoise.weighting"),
    "method stage unknown": ([*G, "methods.freelong.stages=[refine]"], "methods.freelong.stages: no stage 'refine'"),
    "two methods one site": ([*G, *AD, "video.num_frames=40", "methods.freenoise.fusion=layer", "methods.freelong.full_resolution=blend"],
                             "patches the same temporal attention sites"),
    "stage not a mapping": ([*G, "stages.base=5"], "stages.base: expected a mapping"),
    "stage strength": ([*G, "stages.base.height=32", "stages.refine.strength=2"], "stages.refine.strength: must be in (0, 1]"),
    "stage shrinks": ([*G, "stages.base.height=128", "stages.refine={}"], "stages.refine.height: 64 is smaller"),
    "stage unknown key": ([*G, "stages.base.heigth=32"], "stages.base.heigth: unknown key"),
    "stage bad name": ([*G, "stages.b@se.height=32"], "stages.b@se: a stage name uses letters"),
    # --- the command line itself
    "seed not an int": ([*G, "--seed", "abc"], "Invalid value for '--seed'"),
    "unknown option": ([*G, "--sed", "3"], "No such option: --sed"),
    "unknown command": (["genrate"], "No such command 'genrate'"),
    "missing recipe option": (["generate"], "Missing option '--recipe'"),
    "same frame twice": (["generate", "--recipe", "{tmp}/twokeys.yaml"], "Conflicting integer and string keys"),
    "stride beyond the default window": ([*G, "video.num_frames=41", "methods.freenoise.stride=100"],
                                         "methods.freenoise.stride: must not exceed the window (81 frames)"),
    "multi-prompt across frame counts": ([*G, "--prompt-at", "0:a", "--prompt-at", "8:b", "methods.freenoise={}",
                                          "stages.base.num_frames=9", "stages.base.height=32",
                                          "stages.refine.upsample=latent"], "prompt: keyframes are frames of the output"),
    "clock in the name with checkpoints": ([*G, "--name", "{date}-{seed}", "runtime.checkpoint=on_signal"],
                                           "output.name: {date} changes on every run"),
    "name spec fails for large seeds": ([*G, "--name", "{seed:c}"], "output.name: name template field {seed:c}"),
    "deprecated scheduler": ([*G, "sampler.scheduler=KarrasVeScheduler"], "KarrasVeScheduler is not a step-by-step sampling scheduler"),
    "validate nothing": (["validate", "{tmp}/none"], "paths: no such file or folder"),
}


@pytest.fixture
def scratch(tmp_path):
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "o" / "taken.mp4").mkdir(parents=True)
    return tmp_path


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_any_work(case, scratch, monkeypatch):
    args, fragment = CASES[case]
    args = [a.replace("{tmp}", str(scratch)) for a in args]
    fragment = fragment.replace("{tmp}", str(scratch))
    if args[0] == "generate" and "--out" not in args:
        args += ["--out", str(scratch / "out")]
    loads = []
    monkeypatch.setattr(longvid_runner, "load_adapter", lambda recipe: loads.append(recipe) or pytest.fail("loaded"))
    before = _files(scratch)
    result = CliRunner().invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not a crash
    assert "Traceback" not in result.output
    assert lines and all(line.startswith("error: ") or line.startswith("  ") for line in lines), result.stderr
    assert len(lines) == 1 or lines[0].startswith("error: ") and "problems" in lines[0], result.stderr
    assert any(fragment in line for line in lines), result.stderr
    assert loads == []  # nothing was loaded
    assert _files(scratch) == before  # no file, no folder


def test_the_table_is_big_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("args, fragment", [
    (["model.path=/nonexistent/longvid-model"], "model.path: no folder '/nonexistent/longvid-model'"),
    (["model.path={tmp}/afile"], "is a file; expected a hub id or a diffusers model folder"),
    (["model.path={tmp}/o"], "is a folder but not a diffusers model"),
    (["model.path=longvid-test/not-cached"], "`hf download longvid-test/not-cached`"),
])
def test_model_problems_are_one_line_and_leave_nothing(args, fragment, scratch):
    args = [a.replace("{tmp}", str(scratch)) for a in args]
    before = _files(scratch)
    result = CliRunner().invoke(app, [*G, *args, "--out", str(scratch / "out")], env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "hf download /" not in lines[0] and f"hf download {scratch}" not in lines[0]  # no download advice for paths
    assert _files(scratch) == before


def test_validate_reports_every_file_and_does_not_stop(scratch):
    good = scratch / "good.yaml"
    good.write_text("model: {family: wan, path: 'tiny:wan'}\n")
    result = CliRunner().invoke(app, ["validate", str(scratch)])
    assert result.exit_code == 2
    out = result.stdout
    assert f"ok       {good}" in out
    for name in ("broken.yaml", "list.yaml", "python.yaml", "interp.yaml", "binary.yaml", "nomodel.yaml"):
        assert f"invalid  {scratch / name}" in out or str(scratch / name) in out, name
    assert out.strip().splitlines()[-1].startswith("1 valid, ")


@pytest.mark.parametrize("args, fragment", [
    (["sampler.scheduler=DDPMScheduler"], "sampler.scheduler: DDPMScheduler cannot run this model's schedule"),
    (["sampler.scheduler=EulerDiscreteScheduler"], "EulerDiscreteScheduler cannot run this model's schedule"),
    (["sampler.scheduler=AmusedScheduler"], "AmusedScheduler cannot run this model's schedule"),
    (["sampler.scheduler_config.num_train_timesteps=0"], "UniPCMultistepScheduler cannot run this model's schedule"),
    (["sampler.scheduler=FlowMatchHeunDiscreteScheduler"], "FlowMatchHeunDiscreteScheduler is a second-order scheduler"),
    (["stages.base.height=32", "stages.refine.sampler.scheduler=DDPMScheduler"],
     "stages.refine.sampler.scheduler: DDPMScheduler cannot run"),
])
def test_a_scheduler_that_cannot_run_the_model_is_refused_before_denoising(args, fragment, scratch, monkeypatch):
    """Only the loaded model's scheduler config tells: refused right after loading, before any step."""
    monkeypatch.setattr(longvid_runner, "denoise_latents", lambda *a, **k: pytest.fail("denoised"))
    before = _files(scratch)
    result = CliRunner().invoke(app, [*G, *args, "--out", str(scratch / "out")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert _files(scratch) == before
