"""Loading Pyramid Flow from the released layout (``rain1011/pyramid-flow-{miniflux,sd3}``, notes §1).

A checkpoint folder holds ``diffusion_transformer_{384p,768p,image}/``, ``causal_video_vae/``, ``text_encoder*/``
and ``tokenizer*/``. The DiT and the VAE are plain state dicts (fp32 safetensors; pickled ``.bin`` in older
uploads and in miniflux's VAE, read with ``weights_only=True``) that load **strictly** into longvid's modules:
the DiT kind is told by its keys (``x_embedder`` = miniFLUX, ``pos_embed.proj`` = SD3), its sizes come from its
config.json (the same names diffusers uses) where the folder has one, checked against the sizes its weights' shapes
and key names give (:func:`dit_sizes`), the VAE's widths and depths from its weights' shapes. Text encoders and
tokenizers load with transformers' ``from_pretrained``.

Single files (``model.options.transformer_file`` / ``vae_file``: one safetensors file with the official keys, as
ComfyUI users have them, fp32, bf16, fp16 or fp8 e4m3fn/e5m2 storage) replace the folder's DiT or VAE; without a
config.json the DiT is built from the sizes of its weights alone. Every weight is cast to the run's dtype at load
(fp8 storage saves disk, not memory).
"""

from __future__ import annotations

import json
import math
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


TRANSFORMER_FILE, VAE_FILE = "model.options.transformer_file", "model.options.vae_file"


def read_state(path: Path, key: str = "model.path") -> dict[str, torch.Tensor]:
    """The state dict of a folder's ``diffusion_pytorch_model.{safetensors,bin}`` or of one file (errors name
    ``key``, the recipe key the path came from)."""
    if path.is_dir():
        found = next((path / name for name in WEIGHTS if (path / name).is_file()), None)
        if found is None:
            raise ModelLoadError(f"{key}: {path} holds none of {', '.join(WEIGHTS)}")
        path = found
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file: one line either way
            first = " ".join(str(err).split())[:200]
            raise ModelLoadError(f"{key}: {path} is not a readable safetensors file ({first}); download it "
                                 f"again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as err:  # noqa: BLE001 - any unpickling refusal is the same user error
        raise ModelLoadError(f"{key}: {path} is not a plain tensor checkpoint ({err})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of ``state`` (fp32, bf16, fp16, fp8 storage) in ``dtype`` (None: as stored)."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _config(folder: Path) -> dict:
    file = folder / "config.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def dit_kind(state: dict, key: str = "model.path") -> str:
    if "x_embedder.weight" in state:
        return "miniflux"
    if "pos_embed.proj.weight" in state:
        return "sd3"
    raise ModelLoadError(f"{key}: the DiT weights are neither Pyramid Flow miniFLUX nor SD3 (no x_embedder or "
                         "pos_embed.proj)")


def dit_sizes(state: dict, key: str = "model.path") -> dict:
    """The DiT's config values its weights determine (official key names): block counts from the key names, the
    width from the patch embedding, the head dim from the qk-norm weights (64 without them), heads = width / head
    dim, the text and pooled widths from their embedders; SD3 also the patch, the channels and the pos-embed grid."""
    kind = dit_kind(state, key)

    def dim(name: str, axis: int):
        return state[name].shape[axis] if name in state and state[name].dim() > axis else None

    def blocks(prefix: str) -> int:
        return 1 + max((int(k.split(".")[1]) for k in state if k.startswith(prefix) and k.split(".")[1].isdigit()),
                       default=-1)

    head = dim("transformer_blocks.0.attn.norm_q.weight", 0) or 64
    embed = "x_embedder.weight" if kind == "miniflux" else "pos_embed.proj.weight"
    width = state[embed].shape[0]
    if width % head:
        raise ModelLoadError(f"{key}: the DiT is {width} wide, not a multiple of its head dim {head}; it is not a "
                             f"Pyramid Flow DiT")
    sizes = {"num_layers": blocks("transformer_blocks."), "attention_head_dim": head,
             "num_attention_heads": width // head, "in_channels": state[embed].shape[1],
             "joint_attention_dim": dim("context_embedder.weight", 1),
             "pooled_projection_dim": dim("time_text_embed.text_embedder.linear_1.weight", 1)}
    if kind == "miniflux":
        sizes["num_single_layers"] = blocks("single_transformer_blocks.")
    else:
        patch = state[embed].shape[-1]
        grid = dim("pos_embed.pos_embed", 1)
        out = dim("proj_out.weight", 0)
        sizes.update(patch_size=patch, caption_projection_dim=dim("context_embedder.weight", 0),
                     out_channels=out // patch**2 if out else None,
                     pos_embed_max_size=math.isqrt(grid) if grid and math.isqrt(grid) ** 2 == grid else None)
    return {k: v for k, v in sizes.items() if v is not None}


def build_dit(state: dict, config: dict, key: str = "model.path", dtype: torch.dtype | None = None,
              source: str = "config.json"):
    """The DiT of ``state`` (official keys) and loaded strictly, in ``dtype`` (None: float32). Returns (kind, model).

    Its sizes come from the weights (:func:`dit_sizes`) and, for what weights cannot tell (RoPE axes), from
    ``config`` (the variant's config.json, ``source``; empty: the released defaults); a config that disagrees with
    the weights is refused. Errors name ``key``."""
    kind = dit_kind(state, key)
    sizes = dit_sizes(state, key)
    for name, value in sizes.items():
        if config.get(name) is not None and config[name] != value:
            raise ModelLoadError(f"{key}: the DiT weights have {name}={value} but {source} says {config[name]}; "
                                 f"the weights and model.path are different models (use the checkpoint they come "
                                 f"from)")
    if kind == "miniflux":
        from diffusers import FluxTransformer2DModel

        from longvid.models.pyramid_flow.dit_flux import MINIFLUX_CONFIG

        settings = {**MINIFLUX_CONFIG, **{k: config[k] for k in _FLUX_KEYS if k in config}, **sizes}
        settings["axes_dims_rope"] = tuple(settings["axes_dims_rope"])
        if sum(settings["axes_dims_rope"]) != settings["attention_head_dim"]:
            raise ModelLoadError(f"{key}: the RoPE axes {list(settings['axes_dims_rope'])} do not add up to the head "
                                 f"dim {settings['attention_head_dim']}; set axes_dims_rope in the variant's "
                                 f"config.json")
        model = FluxTransformer2DModel(**settings)
    else:
        from longvid.models.pyramid_flow.dit_sd3 import build_sd3, remap_keys

        model = build_sd3(**{**{k: config[k] for k in _SD3_KEYS if k in config}, **sizes})
        state = remap_keys(state)
    if dtype is not None:
        model, state = model.to(dtype), cast_state(state, dtype)
    _strict(model, state, "the DiT", key)
    return kind, model


def build_vae(state: dict, config: dict, key: str = "model.path", dtype: torch.dtype | None = None):
    """The causal VAE of ``state``: widths and depths read from the weights, GroupNorm groups from the config; in
    ``dtype`` (None: float32)."""
    from longvid.models.pyramid_flow.vae import CausalVideoVAE

    if "post_quant_conv.conv.weight" not in state or "encoder.down_blocks.0.resnets.0.conv1.conv.weight" not in state:
        raise ModelLoadError(f"{key}: the weights are not a Pyramid Flow causal VAE (no post_quant_conv or "
                             f"encoder.down_blocks)")
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks.")})
    channels = tuple(state[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"].shape[0] for i in blocks)

    def layers(prefix: str) -> int:
        return len({k.split(".")[4] for k in state if k.startswith(prefix)})

    groups = next((v for k, v in config.items() if k.endswith("norm_num_groups") and isinstance(v, int)), 32)
    vae = CausalVideoVAE(channels=channels, encoder_layers=layers("encoder.down_blocks.0.resnets."),
                         decoder_layers=layers("decoder.up_blocks.0.resnets."), groups=groups,
                         latent=state["post_quant_conv.conv.weight"].shape[0])
    if dtype is not None:
        vae, state = vae.to(dtype), cast_state(state, dtype)
    _strict(vae, state, "the VAE", key)
    return vae


def _strict(model: torch.nn.Module, state: dict, what: str, key: str = "model.path") -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch: name the first one
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ModelLoadError(f"{key}: {what} does not match the released Pyramid Flow layout ({first[:300]})") from None
    if result.missing_keys or result.unexpected_keys:
        missing, extra = result.missing_keys[:3], result.unexpected_keys[:3]
        raise ModelLoadError(f"{key}: {what} does not match the released Pyramid Flow layout (missing "
                             f"{len(result.missing_keys)}: {missing}; unexpected {len(result.unexpected_keys)}: {extra})")


def load_folder(root: Path, variant: str, dtype: torch.dtype, text_dtype: torch.dtype, vae_dtype: torch.dtype,
                transformer_file: Path | None = None, vae_file: Path | None = None) -> dict:
    """Every component of an official-layout folder: ``{"kind", "dit", "vae", "text_encoder…", "tokenizer…"}``;
    ``transformer_file`` / ``vae_file`` (single safetensors files with the official keys) replace the folder's DiT /
    VAE weights (the folder's config.json, where there is one, still applies)."""
    import transformers
    from transformers import AutoTokenizer

    if variant not in VARIANTS:
        raise ModelLoadError(f"model.variant: one of {', '.join(VARIANTS)}, got {variant!r}")
    folder = root / variant
    if transformer_file is None:
        if not folder.is_dir():
            raise ModelLoadError(f"model.path: {root} has no {variant}/ (a rain1011/pyramid-flow-* folder is expected)")
        kind, dit = build_dit(read_state(folder), _config(folder), dtype=dtype, source=f"{variant}/config.json")
    else:
        state = read_state(transformer_file, TRANSFORMER_FILE)
        kind = dit_kind(state, TRANSFORMER_FILE)
        three = (root / "text_encoder_3").is_dir()  # SD3 has CLIP-L, CLIP-G and T5; miniFLUX CLIP-L and T5
        if three != (kind == "sd3"):
            other = "sd3" if three else "miniflux"
            raise ModelLoadError(f"{TRANSFORMER_FILE}: a {'miniFLUX' if kind == 'miniflux' else 'SD3'} DiT, but "
                                 f"model.path {root} holds the text encoders of pyramid-flow-{other}; point model.path "
                                 f"at rain1011/pyramid-flow-{kind}")
        kind, dit = build_dit(state, _config(folder), TRANSFORMER_FILE, dtype, source=f"{variant}/config.json")
    vae_folder = root / "causal_video_vae"
    vae_state = read_state(vae_folder) if vae_file is None else read_state(vae_file, VAE_FILE)
    vae = build_vae(vae_state, _config(vae_folder), "model.path" if vae_file is None else VAE_FILE, vae_dtype)
    components = {"kind": kind, "dit": dit.eval(), "vae": vae.eval()}
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
