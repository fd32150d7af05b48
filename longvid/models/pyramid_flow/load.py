"""Loading Pyramid Flow from the released layout (``rain1011/pyramid-flow-{miniflux,sd3}``, notes §1).

A checkpoint folder holds ``diffusion_transformer_{384p,768p,image}/``, ``causal_video_vae/``, ``text_encoder*/``
and ``tokenizer*/``. The DiT and the VAE are plain state dicts (fp32 safetensors; pickled ``.bin`` in older
uploads and in miniflux's VAE, read with ``weights_only=True``) that load **strictly** into longvid's modules:
the DiT kind is told by its keys (``x_embedder`` = miniFLUX, ``pos_embed.proj`` = SD3), its sizes come from its
config.json (the same names diffusers uses), the VAE's widths and depths from its weights' shapes. Text encoders
and tokenizers load with transformers' ``from_pretrained``. A single safetensors file with the official keys (as
ComfyUI users have them) is read by :func:`read_state` too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from longvid.errors import ModelLoadError

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
VARIANTS = ("diffusion_transformer_384p", "diffusion_transformer_768p", "diffusion_transformer_image")
_FLUX_KEYS = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
              "pooled_projection_dim", "axes_dims_rope")
_SD3_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
             "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
             "pos_embed_max_size")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a folder's ``diffusion_pytorch_model.{safetensors,bin}`` or of one file."""
    if path.is_dir():
        found = next((path / name for name in WEIGHTS if (path / name).is_file()), None)
        if found is None:
            raise ModelLoadError(f"model.path: {path} holds none of {', '.join(WEIGHTS)}")
        path = found
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as err:  # noqa: BLE001 - any unpickling refusal is the same user error
        raise ModelLoadError(f"model.path: {path} is not a plain tensor checkpoint ({err})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _config(folder: Path) -> dict:
    file = folder / "config.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def dit_kind(state: dict) -> str:
    if "x_embedder.weight" in state:
        return "miniflux"
    if "pos_embed.proj.weight" in state:
        return "sd3"
    raise ModelLoadError("model.path: the DiT weights are neither Pyramid Flow miniFLUX nor SD3 (no x_embedder or "
                         "pos_embed.proj)")


def build_dit(state: dict, config: dict):
    """The DiT of ``state`` (official keys), built from ``config`` and loaded strictly. Returns (kind, model)."""
    kind = dit_kind(state)
    if kind == "miniflux":
        from diffusers import FluxTransformer2DModel

        from longvid.models.pyramid_flow.dit_flux import MINIFLUX_CONFIG

        settings = {**MINIFLUX_CONFIG, **{k: config[k] for k in _FLUX_KEYS if k in config}}
        settings["axes_dims_rope"] = tuple(settings["axes_dims_rope"])
        model = FluxTransformer2DModel(**settings)
    else:
        from longvid.models.pyramid_flow.dit_sd3 import build_sd3, remap_keys

        model = build_sd3(**{k: config[k] for k in _SD3_KEYS if k in config})
        state = remap_keys(state)
    _strict(model, state, "the DiT")
    return kind, model


def build_vae(state: dict, config: dict):
    """The causal VAE of ``state``: widths and depths read from the weights, GroupNorm groups from the config."""
    from longvid.models.pyramid_flow.vae import CausalVideoVAE

    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks.")})
    channels = tuple(state[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"].shape[0] for i in blocks)

    def layers(prefix: str) -> int:
        return len({k.split(".")[4] for k in state if k.startswith(prefix)})

    groups = next((v for k, v in config.items() if k.endswith("norm_num_groups") and isinstance(v, int)), 32)
    vae = CausalVideoVAE(channels=channels, encoder_layers=layers("encoder.down_blocks.0.resnets."),
                         decoder_layers=layers("decoder.up_blocks.0.resnets."), groups=groups,
                         latent=state["post_quant_conv.conv.weight"].shape[0])
    _strict(vae, state, "the VAE")
    return vae


def _strict(model: torch.nn.Module, state: dict, what: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, extra = result.missing_keys[:3], result.unexpected_keys[:3]
        raise ModelLoadError(f"model.path: {what} does not match the released Pyramid Flow layout (missing "
                             f"{len(result.missing_keys)}: {missing}; unexpected {len(result.unexpected_keys)}: {extra})")


def load_folder(root: Path, variant: str, dtype: torch.dtype, text_dtype: torch.dtype,
                vae_dtype: torch.dtype) -> dict:
    """Every component of an official-layout folder: ``{"kind", "dit", "vae", "text_encoder…", "tokenizer…"}``."""
    import transformers
    from transformers import AutoTokenizer

    if variant not in VARIANTS:
        raise ModelLoadError(f"model.variant: one of {', '.join(VARIANTS)}, got {variant!r}")
    folder = root / variant
    if not folder.is_dir():
        raise ModelLoadError(f"model.path: {root} has no {variant}/ (a rain1011/pyramid-flow-* folder is expected)")
    kind, dit = build_dit(read_state(folder), _config(folder))
    vae = build_vae(read_state(root / "causal_video_vae"), _config(root / "causal_video_vae"))
    components = {"kind": kind, "dit": dit.to(dtype).eval(), "vae": vae.to(vae_dtype).eval()}
    for suffix in ("", "_2", "_3"):
        if (root / f"text_encoder{suffix}").is_dir():
            config = _config(root / f"text_encoder{suffix}")
            name = (config.get("architectures") or ["?"])[0]  # CLIPTextModel(WithProjection), T5EncoderModel
            if name not in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "UMT5EncoderModel"):
                raise ModelLoadError(f"model.path: text_encoder{suffix}/ is a {name}, not a CLIP or T5 encoder")
            components[f"text_encoder{suffix}"] = getattr(transformers, name).from_pretrained(
                root / f"text_encoder{suffix}", dtype=text_dtype).eval()
            components[f"tokenizer{suffix}"] = AutoTokenizer.from_pretrained(root / f"tokenizer{suffix}")
    return components
