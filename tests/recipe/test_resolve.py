"""Recipe resolution: layering order, free text, collected problems, one-line messages, recipe lookup."""

import json

import pytest

from longvid.errors import RecipeError
from longvid.recipe.recipes import builtin_dir, find_recipe
from longvid.recipe.resolve import resolve, to_dict

WAN_TINY = {"model": {"family": "wan", "path": "tiny:wan"}}
AD_TINY = {"model": {"family": "animatediff", "path": "tiny:animatediff"}}


def _error(recipe, overrides=(), options=None) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        resolve(recipe, list(overrides), options)
    return info.value


# ------------------------------------------------------------------------------------------- layering


@pytest.fixture
def layered_yaml(tmp_path):
    path = tmp_path / "layers.yaml"
    path.write_text(
        "model: {family: wan, path: 'tiny:wan'}\n"
        "video: {num_frames: 9, height: 32, width: 48}\n"
        "sampler: {steps: 8, guidance_scale: 3.0}\n"
        "seed: 1\n"
    )
    return path


def test_each_layer_overrides_the_one_before(layered_yaml):
    r = resolve(layered_yaml, ["sampler.steps=4", "video.width=64"],
                {"sampler.steps": 5, "seed": 7, "video.height": 48, "video.width": 80})
    # schema only (neither the family nor any later layer sets these)
    assert (r.runtime.decode_chunk, r.sampler.eta, r.output.crf, r.output.codec) == (16, 0.0, 18, "libx264")
    # family defaults over the schema's None
    assert (r.video.fps, r.sampler.max_sequence_length) == (16, 512)
    # YAML over family defaults (wan: 81 frames, guidance 5.0)
    assert (r.video.num_frames, r.sampler.guidance_scale) == (9, 3.0)
    # typed options over the YAML
    assert (r.video.height, r.seed) == (48, 7)
    # key=value overrides over typed options
    assert (r.sampler.steps, r.video.width) == (4, 64)
    assert r.name == "layers"  # from the file name


@pytest.mark.parametrize("layers, steps", [
    ({}, 50),                                          # wan family default over the schema's None
    ({"yaml": True}, 8),
    ({"yaml": True, "options": True}, 5),
    ({"yaml": True, "options": True, "override": True}, 4),
    ({"options": True, "override": True}, 4),
    ({"override": True}, 4),
])
def test_one_key_through_every_layer(layers, steps):
    data = {**WAN_TINY, "sampler": {"steps": 8}} if layers.get("yaml") else dict(WAN_TINY)
    options = {"sampler.steps": 5} if layers.get("options") else None
    overrides = ["sampler.steps=4"] if layers.get("override") else []
    assert resolve(data, overrides, options).sampler.steps == steps


def test_family_defaults_follow_the_family_chosen_by_an_override():
    r = resolve(WAN_TINY, ["model.family=animatediff", "model.path=tiny:animatediff"])
    assert (r.video.num_frames, r.video.height, r.sampler.scheduler, r.sampler.steps) == (16, 512, "DDIMScheduler", 25)


# ------------------------------------------------------------------------------------------ free text


def test_prompts_are_kept_exactly_through_options():
    prompt = "A cat: running # 007 [x] yes"
    negative = "#tag: 007, {braces}, 'quotes' \"double\""
    r = resolve(WAN_TINY, [], {"prompt": prompt, "negative_prompt": negative})
    assert r.prompt == prompt
    assert r.negative_prompt == negative


def test_multi_prompt_mapping_needs_a_multi_prompt_method():
    err = _error(WAN_TINY, [], {"prompt": {0: "a calm lake: dawn", 8: "#storm 007"}})
    assert [p.key for p in err.problems] == ["prompt"]
    assert "a {frame: prompt} mapping needs a multi-prompt method" in str(err)


@pytest.mark.parametrize("override, key, flag", [
    ("prompt=a cat", "prompt", "--prompt"),
    ("prompt.0=a cat", "prompt.0", "--prompt-at"),
    ("negative_prompt=blurry", "negative_prompt", "--negative-prompt"),
])
def test_free_text_is_rejected_as_key_value(override, key, flag):
    err = _error(WAN_TINY, [override])
    assert [p.key for p in err.problems] == [key]
    assert "free text cannot be set with key=value" in err.problems[0].message
    assert flag in err.problems[0].message


# ------------------------------------------------------------------------------------ problems at once


def test_every_problem_is_reported_at_once():
    err = _error(WAN_TINY, ["video.num_frames=32", "video.height=100", "sampler.stepz=3", "runtime.offload=foo",
                            "prompt=x", "seed=abc"])
    keys = [p.key for p in err.problems]
    assert sorted(keys) == sorted(["video.num_frames", "video.height", "sampler.stepz", "runtime.offload", "prompt",
                                   "seed"])
    text = str(err)
    assert text.startswith("6 problems:")
    assert all(f"  {k}: " in text for k in keys)


def test_problems_from_yaml_and_overrides_are_collected_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {family: wan, path: 'tiny:wan'}\nvideo: {num_frams: 9}\nsed: 3\n")
    err = _error(path, ["video.width=50"])
    assert sorted(p.key for p in err.problems) == ["sed", "video.num_frams", "video.width"]
    assert err.source == str(path)
    assert str(path) in str(err)


# ---------------------------------------------------------------------------------- one-line messages


BAD_INPUTS = {
    "wan frames not 4k+1": (WAN_TINY, ["video.num_frames=32"], "video.num_frames",
                            ["4k+1", "got 32", "nearest: 29 or 33"]),
    "wan frames 0": (WAN_TINY, ["video.num_frames=0"], "video.num_frames", ["at least 1"]),
    "wan height multiple of 16": (WAN_TINY, ["video.height=100"], "video.height",
                                  ["multiple of 16", "got 100", "96 or 112"]),
    "wan width multiple of 16": (WAN_TINY, ["video.width=40"], "video.width", ["multiple of 16", "32 or 48"]),
    "animatediff multiple of 8": (AD_TINY, ["video.width=100"], "video.width",
                                  ["multiple of 8", "got 100", "96 or 104"]),
    "unknown key": (WAN_TINY, ["video.num_frame=33"], "video.num_frame",
                    ["unknown key", "did you mean 'num_frames'?", "video.num_frame=33"]),
    "unknown top-level key": (WAN_TINY, ["sed=3"], "sed", ["unknown key", "did you mean 'seed'?"]),
    "bad literal offload": (WAN_TINY, ["runtime.offload=foo"], "runtime.offload",
                            ["'foo'", "'none'", "'model'", "'sequential'"]),
    "bad literal codec": (WAN_TINY, ["output.codec=h264"], "output.codec", ["'libx264'", "'libx265'", "'ffv1'"]),
    "bad literal dtype": (WAN_TINY, ["model.dtype=fp16"], "model.dtype", ["'float32'", "'float16'", "'bfloat16'"]),
    "wrong type": (WAN_TINY, ["video.num_frames=many"], "video.num_frames", ["'many'", "Integer"]),
    "no equals sign": (WAN_TINY, ["video.num_frames"], "override #1 'video.num_frames'", ["expected key=value"]),
    "missing model.path": ({"model": {"family": "wan"}}, [], "model.path",
                           ["required", "hub id", "local directory", "tiny:"]),
    "missing model.family": ({"model": {"path": "tiny:wan"}}, [], "model.family",
                             ["required", "wan", "animatediff"]),
    "unknown family": (WAN_TINY, ["model.family=wann"], "model.family", ["did you mean 'wan'?"]),
    "tiny family mismatch": ({"model": {"family": "wan", "path": "tiny:animatediff"}}, [], "model.path",
                             ["tiny:animatediff is a animatediff model", "model.family is wan",
                              "model.family=animatediff"]),
    "unknown tiny variant": ({"model": {"family": "wan", "path": "tiny:wan2"}}, [], "model.path",
                             ["no built-in tiny model 'wan2'", "tiny:wan"]),
    "animatediff beyond motion module": (AD_TINY, ["video.num_frames=48"], "video.num_frames",
                                         ["48 frames exceed", "limit of 32", "add a long-video method"]),
    "negative steps": (WAN_TINY, ["sampler.steps=0"], "sampler.steps", ["at least 1"]),
    "bad device": (WAN_TINY, ["runtime.device=gpu"], "runtime.device", ["auto, cpu, cuda or cuda:N"]),
    "crf range": (WAN_TINY, ["output.crf=60"], "output.crf", ["[0, 51]"]),
    "not a mapping": (WAN_TINY, ["video=3"], "video", ["expected a mapping", "num_frames"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_the_key_and_the_fix(case):
    data, overrides, key, fragments = BAD_INPUTS[case]
    err = _error(data, overrides)
    assert [p.key for p in err.problems] == [key]
    text = str(err)
    assert "\n" not in text
    assert text.startswith(f"{key}: ")
    for fragment in fragments:
        assert fragment in text


def test_animatediff_at_the_motion_module_limit_is_fine():
    assert resolve(AD_TINY, ["video.num_frames=32"]).video.num_frames == 32


@pytest.mark.parametrize("frames, ok", [(1, True), (5, True), (33, True), (81, True), (2, False), (80, False)])
def test_wan_frame_rule(frames, ok):
    if ok:
        assert resolve(WAN_TINY, [f"video.num_frames={frames}"]).video.num_frames == frames
    else:
        below, above = (frames - 1) // 4 * 4 + 1, (frames - 1) // 4 * 4 + 5
        assert f"nearest: {below} or {above}" in str(_error(WAN_TINY, [f"video.num_frames={frames}"]))


def test_unknown_recipe_name_suggests_the_closest():
    err = _error("demoo")
    assert [p.key for p in err.problems] == ["recipe"]
    assert str(err) == ("recipe: no built-in recipe 'demoo' (did you mean 'demo'?) and no file of that name; "
                        "see `longvid recipes`")


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n  family: wan\n")
    err = _error(path)
    text = str(err)
    assert "\n" not in text
    assert text.startswith(f"{path}: not valid YAML")
    assert "line 1" in text


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert str(_error(path)) == f"{path}: a recipe must be a YAML mapping of keys to values"


# -------------------------------------------------------------------------------------- recipe lookup


def test_builtin_recipe_by_name_or_path():
    demo = builtin_dir() / "demo.yaml"
    assert find_recipe("demo") == demo
    by_name, by_path = resolve("demo"), resolve(str(demo))
    assert by_name == by_path
    assert (by_name.name, by_name.model.path, by_name.video.num_frames) == ("demo", "tiny:wan", 17)


@pytest.mark.parametrize("ref", ["demo.yaml", "/no/such/dir/demo.yaml", "./demo", "configs/demo.yml", "demo.json"])
def test_a_path_never_falls_back_to_the_builtin_of_the_same_name(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _error(ref)
    assert str(err) == f"recipe: '{ref}' does not exist; the built-in recipe is --recipe demo"


def test_a_folder_is_not_a_recipe(tmp_path):
    (tmp_path / "demo").mkdir()
    assert str(_error(str(tmp_path / "demo"))) == f"recipe: '{tmp_path / 'demo'}' is a folder, not a recipe file"


def test_existing_path_wins_over_builtin_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text("model: {family: animatediff, path: 'tiny:animatediff'}\nseed: 42\n")
    (tmp_path / "demo").write_text("model: {family: wan, path: 'tiny:wan'}\nseed: 43\n")
    r = resolve("demo.yaml")
    assert (r.model.family, r.seed, r.name) == ("animatediff", 42, "demo")
    assert find_recipe("demo.yaml").resolve() == (tmp_path / "demo.yaml").resolve()
    r = resolve("demo")
    assert (r.model.family, r.seed) == ("wan", 43)


def test_sidecar_json_is_a_recipe(tmp_path):
    original = resolve("demo", ["seed=5", "sampler.steps=3"], {"prompt": "a fox: 007 # [x]"})
    sidecar = {"longvid_sidecar": 1, "output": "x.mp4", "recipe": to_dict(original), "seed": 5,
               "timings": {"total_s": 1.0}}
    path = tmp_path / "video.json"
    path.write_text(json.dumps(sidecar))
    again = resolve(path)
    assert again == original
    assert (again.seed, again.sampler.steps, again.prompt) == (5, 3, "a fox: 007 # [x]")
    # and it layers like any recipe
    assert resolve(path, ["seed=6"], {"output.dir": str(tmp_path / "b")}).seed == 6


def test_multi_prompt_keys_are_frames_whatever_their_type():
    """YAML gives int keys, a JSON sidecar strings: both are frames; one frame twice is refused, not dropped."""
    base = {**WAN_TINY, "methods": {"freenoise": {}}}
    r = resolve({**base, "prompt": {0: "a", "16": "b"}})
    assert r.prompt == {0: "a", 16: "b"}
    err = _error({**base, "prompt": {0: "a", "0": "b"}})
    assert str(err) == "prompt: frame 0 has two prompts (keys 0 and '0')"
    assert "must be frame numbers" in str(_error({**base, "prompt": {0: "a", "x": "b"}}))
