"""FreeLOC as a method: layer presets (built in, probed, or given), the probe, and generation on Wan 2.1 / 2.2."""

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from longvid import runner
from longvid.cli import app
from longvid.errors import MethodError, RecipeError
from longvid.methods.freeloc import FreeLoc, FreeLocConfig, fingerprint
from longvid.models.wan import WanOpProcessor
from longvid.probe import probe, write_preset
from longvid.recipe.resolve import resolve
from tests.helpers import wan_recipe

OFFICIAL_TSA = [0, 1, 4, 6, 7, 9, 10, 11, 13, 14, 15, 16, 18, 22, 23, 24, 25]


def _fake_wan_13b():
    """An adapter-shaped object with Wan 2.1 1.3B's 30 self-attention sites of width 1536."""
    sites = [SimpleNamespace(denoiser="transformer", layer=i, module=SimpleNamespace(inner_dim=1536), kind="full")
             for i in range(30)]
    return SimpleNamespace(attention_sites=lambda kind=None: sites)


def test_the_official_wan_13b_layer_split_is_built_in():
    tsa = FreeLoc(FreeLocConfig())._tsa_layers(_fake_wan_13b())
    assert sorted(tsa["transformer"]) == OFFICIAL_TSA
    assert sorted(set(range(30)) - tsa["transformer"]) == [2, 3, 5, 8, 12, 17, 19, 20, 21, 26, 27, 28, 29]
    assert sorted(FreeLoc(FreeLocConfig(tsa_layers=[3]))._tsa_layers(_fake_wan_13b())["transformer"]) == [3]


def test_a_model_without_a_preset_is_refused_with_the_command():
    adapter = runner.load_adapter(resolve(wan_recipe("tiny:wan")))
    try:
        with pytest.raises(MethodError, match=r"no FreeLOC layer preset .*`longvid probe --recipe"):
            runner.generate(resolve(dict(wan_recipe("tiny:wan", num_frames=161), methods={"freeloc": {}})),
                            adapter=adapter, write=False)
    finally:
        adapter.close()


@pytest.mark.parametrize("variant", ["wan", "wan2.2-a14b"])
def test_probe_writes_a_preset_that_a_recipe_then_uses(variant, tmp_path):
    mapping = dict(wan_recipe(f"tiny:{variant}", num_frames=161), methods={"freeloc": {}})
    mapping["sampler"]["steps"] = 8 if variant == "wan2.2-a14b" else 2
    recipe = resolve(mapping)
    adapter = runner.load_adapter(recipe)
    try:
        preset = probe(adapter, recipe, prompts=("a fox", "a lake"), fractions=(0.3, 0.7))
        path = write_preset(preset, tmp_path / "preset.json")
        denoisers = ["transformer"] + (["transformer_2"] if variant == "wan2.2-a14b" else [])
        assert sorted(preset["tsa"]) == sorted(preset["fingerprint"]) == denoisers
        for den in denoisers:
            table = preset["relative_change"][den]
            assert [row["layer"] for row in table] == [0, 1]
            assert all(row["vrpr"] > 0 and row["tsa"] > 0 for row in table)  # each treatment changes each layer
            assert preset["tsa"][den] == [row["layer"] for row in table if row["tsa"] <= row["vrpr"]]
        used = dict(mapping, methods={"freeloc": {"preset": str(path)}})
        seen = {}

        def spy(event, done, total):
            seen.setdefault("kinds", {(s.denoiser, s.layer): s.module.processor.op.op.kind
                                      for s in adapter.attention_sites("full")
                                      if isinstance(s.module.processor, WanOpProcessor)})

        with_preset = runner.generate(resolve(used), adapter=adapter, write=False, progress=spy).latents
        expected = {(den, layer): "tsa" if layer in preset["tsa"][den] else "vrpr" for den in denoisers
                    for layer in (0, 1)}
        assert seen["kinds"] == expected
        vanilla = runner.generate(resolve(dict(mapping, methods={})), adapter=adapter, write=False).latents
        assert torch.isfinite(with_preset).all() and (with_preset - vanilla).abs().max() > 1e-4
    finally:
        adapter.close()
    other = dict(wan_recipe("tiny:wan2.2-a14b" if variant == "wan" else "tiny:wan", num_frames=161),
                 methods={"freeloc": {"preset": str(path)}})
    with pytest.raises(MethodError, match="was probed on another model"):
        runner.generate(resolve(other), write=False)


@pytest.mark.parametrize("content, text", [("{not json", "not valid JSON"), ('{"format": "x"}', "not a FreeLOC preset"),
                                           (None, "cannot read")])
def test_a_bad_preset_file_is_refused_at_resolve(content, text, tmp_path):
    path = tmp_path / "preset.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RecipeError) as info:
        resolve(dict(wan_recipe("tiny:wan", num_frames=161), methods={"freeloc": {"preset": str(path)}}))
    assert any(p.key == "methods.freeloc.preset" and text in p.message for p in info.value.problems)


def test_freeloc_excludes_other_rope_and_attention_methods():
    for other in ("riflex", "ultravico", "freelong"):
        with pytest.raises(RecipeError, match="patches the same"):
            resolve(dict(wan_recipe("tiny:wan", num_frames=161), methods={"freeloc": {}, other: {}}))


def test_probe_cli(tmp_path):
    out = tmp_path / "p.json"
    args = ["probe", "--recipe", "demo", "video.num_frames=161", "video.height=32", "video.width=48",
            "--prompt", "a fox", "--quiet", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    preset = json.loads(out.read_text())
    assert preset["latent_frames"] == 41 and preset["prompts"] == ["a fox"]
    assert f"wrote {out}" in result.stderr
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.stderr
    missing = CliRunner().invoke(app, ["probe", "--recipe", "demo"])
    assert missing.exit_code == 2 and "--out: name the preset JSON" in missing.stderr


def test_fingerprint_of_a_loaded_model():
    adapter = runner.load_adapter(resolve(wan_recipe("tiny:wan2.2-a14b")))
    try:
        assert fingerprint(adapter) == {"transformer": {"layers": 2, "dim": 72}, "transformer_2": {"layers": 2, "dim": 72}}
    finally:
        adapter.close()
