"""Single-file Pyramid Flow DiT and VAE (``model.options.transformer_file`` / ``vae_file``, ComfyUI's bf16 and fp8
files with the official key names): strict loading cast to the run's dtype, DiT sizes from the weights alone, the
one-line errors, validation before any model work, the hub download without the replaced weights, and a tiny
generation from single files equal to one from the folder holding the same weights."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from longvid.errors import ModelLoadError
from longvid.models.pyramid_flow.load import TRANSFORMER_FILE, VAE_FILE, build_dit, dit_sizes, load_folder, read_state
from tests.models.test_pyramid_flow import TINY_SD3, _pyramid_recipe, _tiny_official_folder

VARIANT = "diffusion_transformer_384p"
HUB_ID = "rain1011/pyramid-flow-miniflux"


def _bf16_exact(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every weight (diffusers zero-initialises adaLN and output layers) and round it to bf16, so a bf16
    file holds exactly the fp32 folder's values."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p + 0.05 * torch.randn_like(p)).bfloat16().float())
    return model.eval()


@pytest.fixture(scope="module")
def tiny_flux():
    from diffusers import FluxTransformer2DModel

    from longvid.models.pyramid_flow.dit_flux import MINIFLUX_CONFIG

    torch.manual_seed(0)
    return _bf16_exact(FluxTransformer2DModel(**{**MINIFLUX_CONFIG, "num_layers": 2, "num_single_layers": 3,
                                                 "num_attention_heads": 2, "joint_attention_dim": 32,
                                                 "pooled_projection_dim": 24}))


@pytest.fixture(scope="module")
def tiny_sd3():
    from longvid.models.pyramid_flow.dit_sd3 import build_sd3

    torch.manual_seed(0)
    model = build_sd3(**TINY_SD3)
    with torch.no_grad():
        model.pos_embed.pos_embed.copy_(model.pos_embed.pos_embed.bfloat16().float())
    return _bf16_exact(model)


@pytest.fixture(scope="module")
def tiny_vae():
    from longvid.models.pyramid_flow.vae import CausalVideoVAE

    torch.manual_seed(0)
    return _bf16_exact(CausalVideoVAE(channels=(8, 16, 16, 16), encoder_layers=1, decoder_layers=1, groups=4))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_flux, tiny_sd3, tiny_vae):
    """``folders(kind) -> (full, bare)``: an official-layout folder, and a copy without the DiT's and the VAE's
    weights (text encoders, tokenizers and config.json files only)."""
    made = {}

    def get(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"pyramid-{kind}")
            full = _tiny_official_folder(root / "full", kind, tiny_flux, tiny_sd3, tiny_vae)
            bare = root / "bare"
            shutil.copytree(full, bare, ignore=shutil.ignore_patterns("diffusion_pytorch_model.*"))
            made[kind] = full, bare
        return made[kind]

    return get


def _official_state(kind, tiny_flux, tiny_sd3):
    """The DiT's state dict under the released key names (SD3: ``norm_add_{q,k}``)."""
    if kind == "miniflux":
        return dict(tiny_flux.state_dict())
    return {k.replace(".norm_added_q.", ".norm_add_q.").replace(".norm_added_k.", ".norm_add_k."): v
            for k, v in tiny_sd3.state_dict().items()}


def _save(path: Path, state: dict, dtype: torch.dtype | None = None) -> Path:
    save_file({k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind, storage, run", [
    ("miniflux", torch.bfloat16, torch.float32),
    ("miniflux", torch.float8_e4m3fn, torch.bfloat16),
    ("sd3", torch.float8_e4m3fn, torch.float32),
    ("sd3", torch.float8_e5m2, torch.bfloat16),
], ids=lambda v: str(v).removeprefix("torch."))
def test_single_files_load_strictly_as_their_values_in_the_run_dtype(kind, storage, run, tmp_path, folders, tiny_flux,
                                                                     tiny_sd3, tiny_vae):
    from longvid.models.pyramid_flow.dit_sd3 import remap_keys

    _, bare = folders(kind)  # no DiT or VAE weights: they can only come from the files
    dit_file = _save(tmp_path / "dit.safetensors", _official_state(kind, tiny_flux, tiny_sd3), storage)
    vae_file = _save(tmp_path / "vae.safetensors", tiny_vae.state_dict(), storage)
    parts = load_folder(bare, VARIANT, run, torch.float32, run, transformer_file=dit_file, vae_file=vae_file)
    assert parts["kind"] == kind
    for model, stored, reference in ((parts["dit"], remap_keys(load_file(str(dit_file))),
                                      tiny_flux if kind == "miniflux" else tiny_sd3),
                                     (parts["vae"], load_file(str(vae_file)), tiny_vae)):
        loaded = model.state_dict()
        assert sorted(loaded) == sorted(stored)  # strict: the same keys
        assert {v.dtype for v in stored.values()} == {storage} and {v.dtype for v in loaded.values()} == {run}
        assert all(torch.equal(loaded[k], stored[k].to(run)) for k in stored)  # the file's values, cast
        if storage != torch.bfloat16:  # fp8 rounds: the values are the file's, not the model it was made from
            changed = [k for k, v in reference.state_dict().items() if not torch.equal(v.to(run), loaded[k])]
            assert len(changed) > len(stored) // 2


@pytest.mark.parametrize("kind", ["miniflux", "sd3"])
@torch.no_grad()
def test_a_dit_without_config_gets_its_sizes_from_the_weights(kind, tmp_path, folders, tiny_flux, tiny_sd3):
    from longvid.models.pyramid_flow.dit_flux import flux_forward
    from longvid.models.pyramid_flow.dit_sd3 import sd3_forward
    from longvid.models.pyramid_flow.load import _config

    full, _ = folders(kind)
    file = _save(tmp_path / "dit.safetensors", _official_state(kind, tiny_flux, tiny_sd3))
    state = read_state(file, TRANSFORMER_FILE)
    _, bare = build_dit(state, {}, TRANSFORMER_FILE)  # no config at all
    _, with_config = build_dit(read_state(full / VARIANT), _config(full / VARIANT))  # the folder's way
    reference = tiny_flux if kind == "miniflux" else tiny_sd3
    names = (["num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
              "pooled_projection_dim", "in_channels"] if kind == "miniflux" else
             ["num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
              "caption_projection_dim", "pooled_projection_dim", "in_channels", "patch_size", "out_channels",
              "pos_embed_max_size"])
    assert {n: bare.config[n] for n in names} == {n: reference.config[n] for n in names}
    assert dit_sizes(state)["num_layers"] == 2 and (kind == "sd3" or dit_sizes(state)["num_single_layers"] == 3)
    torch.manual_seed(4)
    clips = [torch.randn(2, 16, 2, 4, 4), torch.randn(2, 16, 1, 8, 8), torch.randn(2, 16, 1, 16, 16)]
    text, mask, pooled = torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), torch.randn(2, 24)
    forward = flux_forward if kind == "miniflux" else sd3_forward
    t = torch.tensor([600.0, 600.0])
    out = forward(bare.eval(), clips, text, mask, pooled, t)
    assert torch.equal(out, forward(with_config.eval(), clips, text, mask, pooled, t))
    assert out.abs().max() > 0.1


@pytest.mark.parametrize("name", ["miniflux-dit-keys.txt", "sd3-dit-keys.txt"])
def test_the_released_key_lists_give_the_released_configs(name):
    from longvid.models.pyramid_flow.dit_flux import MINIFLUX_CONFIG
    from longvid.models.pyramid_flow.dit_sd3 import SD3_CONFIG

    keys = Path(__file__).resolve().parent / "data" / "pyramid-flow-keys" / name
    state = {}
    for line in keys.read_text().splitlines():  # name -> shape, as meta tensors: sizes only, no memory
        key, shape = line.split("\t")
        state[key] = torch.empty(tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), device="meta")
    sizes = dit_sizes(state)
    config = MINIFLUX_CONFIG if name.startswith("miniflux") else SD3_CONFIG
    assert sizes == {k: config[k] for k in sizes}  # notes §1.3: 8 + 16 blocks of 30 x 64 / 24 layers of 24 x 64
    assert len(sizes) == (7 if name.startswith("miniflux") else 10)


def test_a_config_that_disagrees_with_the_weights_is_refused(tmp_path, tiny_flux, tiny_sd3):
    state = _official_state("miniflux", tiny_flux, tiny_sd3)
    with pytest.raises(ModelLoadError) as err:
        build_dit(state, {"num_layers": 8, "num_attention_heads": 2}, TRANSFORMER_FILE,
                  source=f"{VARIANT}/config.json")
    assert str(err.value) == (f"{TRANSFORMER_FILE}: the DiT weights have num_layers=2 but {VARIANT}/config.json says "
                              f"8; the weights and model.path are different models (use the checkpoint they come "
                              f"from)")


def test_wrong_keys_and_shapes_give_the_one_line_error(tmp_path, folders, tiny_flux, tiny_sd3, tiny_vae):
    _, bare = folders("miniflux")
    state = _official_state("miniflux", tiny_flux, tiny_sd3)
    good_vae = _save(tmp_path / "vae.safetensors", tiny_vae.state_dict(), torch.bfloat16)

    def load(dit_state, vae=good_vae):
        file = _save(tmp_path / "dit.safetensors", dit_state, torch.bfloat16)
        with pytest.raises(ModelLoadError) as err:
            load_folder(bare, VARIANT, torch.float32, torch.float32, torch.float32, transformer_file=file, vae_file=vae)
        assert "\n" not in str(err.value)
        return str(err.value)

    damaged = {k: v for k, v in state.items() if k != "proj_out.bias"}
    damaged["scale_weight"] = torch.ones(1)  # a "scaled fp8" extra
    assert load(damaged) == (f"{TRANSFORMER_FILE}: the DiT does not match the released Pyramid Flow layout (missing 1: "
                             f"['proj_out.bias']; unexpected 1: ['scale_weight'])")
    assert load({**state, "proj_out.weight": state["proj_out.weight"][:32]}).startswith(
        f"{TRANSFORMER_FILE}: the DiT does not match the released Pyramid Flow layout (size mismatch for "
        f"proj_out.weight")
    vae_state = {k: v for k, v in tiny_vae.state_dict().items() if k != "decoder.conv_out.conv.bias"}
    assert load(state, _save(tmp_path / "bad-vae.safetensors", vae_state)) == (
        f"{VAE_FILE}: the VAE does not match the released Pyramid Flow layout (missing 1: "
        f"['decoder.conv_out.conv.bias']; unexpected 0: [])")
    _, sd3_folder = folders("sd3")  # a miniFLUX DiT with the SD3 checkpoint's three text encoders
    file = _save(tmp_path / "dit.safetensors", state, torch.bfloat16)
    with pytest.raises(ModelLoadError, match=f"^{TRANSFORMER_FILE}: a miniFLUX DiT, but model.path .* holds the text "
                                             f"encoders of pyramid-flow-sd3; point model.path at "
                                             f"rain1011/pyramid-flow-miniflux$"):
        load_folder(sd3_folder, VARIANT, torch.float32, torch.float32, torch.float32, transformer_file=file)


# --------------------------------------------------------------------------------------------- validation


def _bad_files(tmp_path: Path, tiny_flux, tiny_sd3) -> dict[str, Path]:
    dit = _save(tmp_path / "dit.safetensors", _official_state("miniflux", tiny_flux, tiny_sd3), torch.bfloat16)
    bin_file = tmp_path / "dit.bin"
    torch.save({"x_embedder.weight": torch.zeros(2)}, bin_file)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    truncated = tmp_path / "truncated.safetensors"
    data = dit.read_bytes()
    truncated.write_bytes(data[:8 + int.from_bytes(data[:8], "little") + 100])  # the header, then 100 bytes of data
    ints = _save(tmp_path / "ints.safetensors", {"x_embedder.weight": torch.zeros(2, dtype=torch.int64)})
    return {"dit": dit, "bin": bin_file, "garbage": garbage, "truncated": truncated, "ints": ints}


@pytest.mark.parametrize("option, file, path, message", [
    ("transformer_file", "missing", HUB_ID, "no file '{file}'; give the path of the .safetensors file of the DiT"),
    ("transformer_file", "bin", HUB_ID, "'{file}' is not a .safetensors file; single files must be safetensors"),
    ("vae_file", "garbage", HUB_ID, "'{file}' is not a readable safetensors file (Error while deserializing header"),
    ("transformer_file", "truncated", HUB_ID, "'{file}' is not a readable safetensors file (Error while deserializing header: incomplete metadata"),
    ("transformer_file", "ints", HUB_ID, "'{file}' stores I64 tensors; only float files"),
    ("vae_file", "dit", HUB_ID, "'{file}' is not a Pyramid Flow causal VAE (it holds a DiT: give it as "
                                "model.options.transformer_file)"),
    ("transformer_file", "dit", "tiny:pyramid-flow", "tiny:pyramid-flow builds its own random weights"),
], ids=["missing", "pickle", "garbage", "truncated", "integers", "dit-as-vae", "tiny-path"])
def test_bad_single_files_are_refused_by_validate_with_exit_2(option, file, path, message, tmp_path, tiny_flux,
                                                              tiny_sd3):
    from longvid.cli import app

    files = _bad_files(tmp_path, tiny_flux, tiny_sd3)
    value = str(files.get(file, tmp_path / "missing.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"family": "pyramid_flow", "path": path, "options": {option: value}},
                                      "video": {"num_frames": 9, "height": 64, "width": 64}}))
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    line = result.stdout.strip().splitlines()[0]
    assert line.startswith(f"invalid  {recipe}: model.options.{option}: {message.format(file=value)}"), line


def test_generate_refuses_a_missing_file_before_loading(tmp_path, monkeypatch):
    from longvid.cli import app
    from longvid.models.pyramid_flow import adapter

    def no_loading(*args, **kwargs):
        raise AssertionError("loading started")

    monkeypatch.setattr(adapter.PyramidFlowAdapter, "_load_pipeline", classmethod(no_loading))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"family": "pyramid_flow", "path": HUB_ID}}))
    missing = tmp_path / "nope" / "pyramid_flow_miniflux_bf16_v2.safetensors"
    result = CliRunner().invoke(app, ["generate", "--recipe", str(recipe), "--out", str(tmp_path),
                                      f"model.options.vae_file={missing}"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: {recipe}: model.options.vae_file: no file '{missing}'; give the path "
                                     f"of the .safetensors file of the causal VAE")


def test_paths_are_never_evaluated(tmp_path):
    from longvid.errors import RecipeError
    from longvid.recipe.resolve import resolve

    def check(value):
        with pytest.raises(RecipeError) as err:
            resolve({**_pyramid_recipe(), "model": {"family": "pyramid_flow", "path": HUB_ID,
                                                    "options": {"transformer_file": value}}})
        return str(err.value)

    assert check("${oc.env:HOME}/x.safetensors") == ("model.options.transformer_file: '${oc.env:HOME}/x.safetensors' "
                                                     "is an interpolation, which recipes do not evaluate; write the "
                                                     "value itself, or pass --interpolate to evaluate it")
    assert check("$HOME/x.safetensors").startswith("model.options.transformer_file: no file '$HOME/x.safetensors'")


def test_the_files_are_part_of_the_load_key(tmp_path, tiny_flux, tiny_sd3, tiny_vae):
    from longvid.models.base import load_key
    from longvid.recipe.resolve import resolve

    a = _save(tmp_path / "a.safetensors", _official_state("miniflux", tiny_flux, tiny_sd3), torch.bfloat16)
    b = _save(tmp_path / "b.safetensors", _official_state("miniflux", tiny_flux, tiny_sd3), torch.float8_e4m3fn)

    def key(file):
        options = {"image_steps": [1, 1, 1], **({"transformer_file": str(file)} if file else {})}
        return load_key(resolve({**_pyramid_recipe(), "model": {"family": "pyramid_flow", "path": HUB_ID,
                                                                "options": options}}))

    assert key(a)["model.options.transformer_file"] == str(a) and key(None)["model.options.transformer_file"] is None
    assert key(a) != key(b) and key(None)["model.options.vae_file"] is None


# --------------------------------------------------------------------------------------------- hub and engine


def test_the_hub_download_skips_the_replaced_weights(tmp_path, monkeypatch, folders, tiny_flux, tiny_sd3, tiny_vae):
    from fnmatch import fnmatch

    import huggingface_hub

    from longvid.models.pyramid_flow.adapter import PyramidFlowAdapter
    from longvid.recipe.schema import ModelConfig

    full, _ = folders("miniflux")
    calls = []

    def snapshot(repo, allow_patterns, **kwargs):  # the hub: the files of the released folder that the patterns allow
        calls.append((repo, allow_patterns))
        target = tmp_path / f"snapshot-{len(calls)}"
        for file in (f for f in full.rglob("*") if f.is_file()):
            name = file.relative_to(full).as_posix()
            if any(fnmatch(name, pattern) for pattern in allow_patterns):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, target / name)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    dit = _save(tmp_path / "dit.safetensors", _official_state("miniflux", tiny_flux, tiny_sd3), torch.bfloat16)
    vae = _save(tmp_path / "vae.safetensors", tiny_vae.state_dict(), torch.float8_e4m3fn)
    dtypes = {"dit": torch.bfloat16, "text_encoder": torch.float32, "vae": torch.float32}
    for options, patterns in [
        ({"transformer_file": str(dit), "vae_file": str(vae)},
         [f"{VARIANT}/config.json", "causal_video_vae/config.json"]),
        ({"transformer_file": str(dit)}, [f"{VARIANT}/config.json", "causal_video_vae/*"]),
        ({"vae_file": str(vae)}, [f"{VARIANT}/*", "causal_video_vae/config.json"]),
        ({}, [f"{VARIANT}/*", "causal_video_vae/*"]),
    ]:
        model = ModelConfig(family="pyramid_flow", path=HUB_ID, options=options)
        pipe = PyramidFlowAdapter._load_pipeline(model, dtypes)
        assert calls[-1] == (HUB_ID, patterns + ["text_encoder*/*", "tokenizer*/*"])
        snapshot_dir = tmp_path / f"snapshot-{len(calls)}"
        downloaded = {f.relative_to(snapshot_dir).as_posix() for f in snapshot_dir.rglob("diffusion_pytorch_model.*")}
        expected = set()
        if "transformer_file" not in options:
            expected.add(f"{VARIANT}/diffusion_pytorch_model.safetensors")
        if "vae_file" not in options:
            expected.add("causal_video_vae/diffusion_pytorch_model.bin")
        assert downloaded == expected and (snapshot_dir / VARIANT / "config.json").is_file()
        assert pipe.kind == "miniflux" and pipe.dit.dtype == torch.bfloat16 and "text_encoder_2" in pipe.text
        assert torch.equal(pipe.vae.state_dict()["post_quant_conv.conv.weight"],
                           (load_file(str(vae)) if "vae_file" in options else tiny_vae.state_dict())[
                               "post_quant_conv.conv.weight"].float())


def test_a_tiny_generation_from_single_files_equals_the_folders(tmp_path, folders, tiny_flux, tiny_sd3, tiny_vae):
    import json

    from longvid import runner
    from longvid.recipe.resolve import resolve

    full, bare = folders("miniflux")
    dit = _save(tmp_path / "dit.safetensors", _official_state("miniflux", tiny_flux, tiny_sd3), torch.bfloat16)
    vae = _save(tmp_path / "vae.safetensors", tiny_vae.state_dict(), torch.bfloat16)
    results = {}
    for name, path, files in (("folder", full, {}), ("files", bare, {"transformer_file": str(dit),
                                                                      "vae_file": str(vae)})):
        recipe = _pyramid_recipe(output={"dir": str(tmp_path), "name": name})
        recipe["model"] = {**recipe["model"], "path": str(path), "options": {**recipe["model"]["options"], **files}}
        results[name] = runner.generate(resolve(recipe))
    assert torch.equal(results["files"].latents, results["folder"].latents)
    assert (tmp_path / "files.mp4").read_bytes() == (tmp_path / "folder.mp4").read_bytes()  # the VAE decoded too
    sidecar = json.loads((tmp_path / "files.json").read_text())
    assert sidecar["recipe"]["model"]["options"]["transformer_file"] == str(dit)
