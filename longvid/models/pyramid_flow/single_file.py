"""Single-file DiT and VAE checkpoints (``model.options.transformer_file`` / ``vae_file``), checked torch-free.

ComfyUI users have Pyramid Flow's DiT and VAE as one ``.safetensors`` file each (``Kijai/pyramid-flow-comfy``:
``pyramid_flow_miniflux_bf16_v2.safetensors``, ``pyramid_flow_miniflux_768_bf16.safetensors``, fp8 variants,
``pyramid_flow_vae_{bf16,fp32}.safetensors``), with the official key names. This module reads such a file's
header with the safetensors library (its numpy front end: no torch import, never the tensors, never any code) so
that ``longvid validate`` and ``generate`` refuse a missing, foreign or damaged file, or a DiT given as the VAE,
before anything loads.
Only safetensors are taken: a single pickled ``.bin`` is refused (the official folder layout's pickles still load
through ``model.path``, with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

#: the option of each single file, and what it replaces in the official folder
FILES = {"transformer_file": "the DiT", "vae_file": "the causal VAE"}
#: safetensors dtypes a file may store; every one is cast to the run's dtype at load
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_DIT_KEYS = ("x_embedder.weight", "pos_embed.proj.weight")  # miniFLUX, SD3
_VAE_KEY = "post_quant_conv.conv.weight"


def read_dtypes(path: Path) -> dict[str, str]:
    """``{tensor name: safetensors dtype}`` of a safetensors file, from its header alone (the library checks that
    the header is well formed and that the tensors' offsets cover the file exactly, so a truncated file fails).
    Raises ``ValueError`` with the library's reason otherwise."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {name: f.get_slice(name).get_dtype() for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(str(err)) from None


def check_file(option: str, value, model_path: str) -> list[tuple[str, str]]:
    """Problems ``[(dotted key, message)]`` of ``model.options.<option>`` = ``value`` (a path, never evaluated)."""
    key = f"model.options.{option}"
    other = next(name for name in FILES if name != option)
    if not isinstance(value, str) or not value.strip():
        return [(key, f"must be the path of a .safetensors file, got {value!r}")]
    if model_path.startswith("tiny:"):
        return [(key, f"{model_path} builds its own random weights; set model.path to a rain1011/pyramid-flow-* "
                      f"folder or hub id (it supplies the text encoders), or remove {key}")]
    file = Path(value).expanduser()
    if not file.is_file():
        return [(key, f"no file '{value}'; give the path of the .safetensors file of {FILES[option]}")]
    if file.suffix.lower() != ".safetensors":
        return [(key, f"'{value}' is not a .safetensors file; single files must be safetensors (ComfyUI's "
                      f"pyramid_flow_*.safetensors); a pickled .bin loads only from the official folder layout "
                      f"(model.path)")]
    try:
        header = read_dtypes(file)
    except (OSError, ValueError) as err:
        return [(key, f"'{value}' is not a readable safetensors file ({err}); download it again")]
    dtypes = sorted(set(header.values()) - set(FLOAT_DTYPES), key=str)
    if dtypes:
        return [(key, f"'{value}' stores {', '.join(map(str, dtypes))} tensors; only float files (fp32, bf16, fp16, "
                      f"fp8 e4m3fn/e5m2) with the official key names load")]
    is_dit = any(k in header for k in _DIT_KEYS)
    is_vae = _VAE_KEY in header
    if option == "transformer_file" and not is_dit:
        hint = f"it holds a VAE: give it as model.options.{other}" if is_vae else \
            "it has no x_embedder (miniFLUX) or pos_embed.proj (SD3) weights"
        return [(key, f"'{value}' is not a Pyramid Flow DiT ({hint})")]
    if option == "vae_file" and not is_vae:
        hint = f"it holds a DiT: give it as model.options.{other}" if is_dit else f"it has no {_VAE_KEY}"
        return [(key, f"'{value}' is not a Pyramid Flow causal VAE ({hint})")]
    return []


def check_options(model) -> list[tuple[str, str]]:
    """Problems of the single-file options of ``model`` (a ``ModelConfig``)."""
    options = model.options or {}
    return [p for option in FILES if options.get(option) is not None
            for p in check_file(option, options[option], model.path)]
