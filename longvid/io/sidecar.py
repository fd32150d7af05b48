"""JSON sidecar written next to each video: what produced it and on what.

The sidecar is the record that makes an output reproducible and lets a re-run skip finished items, so
it is written atomically (temporary name + ``os.replace``): a sidecar that exists is always complete.
Keys keep insertion order (no ``sort_keys``) so the file reads in the order the caller built it.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, is_dataclass
from enum import Enum
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import torch

import longvid
from longvid.io.paths import check_writable, create_exclusive, fsync_file, partial_path, publish, remove_quietly


def sidecar_path(video_path: str | os.PathLike) -> Path:
    """``out/cat.mp4`` -> ``out/cat.json``."""
    return Path(video_path).with_suffix(".json")


def _package_version(name: str) -> str | None:
    """Installed version from package metadata, without importing the (slow) package."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _ffmpeg_version() -> str | None:
    try:
        return imageio_ffmpeg.get_ffmpeg_version()
    except Exception:  # a missing or broken ffmpeg must not stop the sidecar
        return None


def _cudnn_version() -> int | None:
    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        return None


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _device_info(device: torch.device) -> dict[str, Any]:
    """Device name and total memory (bytes; ``None`` for the CPU, whose RAM is not the limit we track)."""
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return {"device_name": props.name, "gpu_total_memory_bytes": int(props.total_memory)}
    if device.type == "cpu":
        return {"device_name": _cpu_name(), "gpu_total_memory_bytes": None}
    return {"device_name": device.type, "gpu_total_memory_bytes": None}


def _cpu_name() -> str:
    """CPU model ("AMD EPYC 9654 ...") from /proc/cpuinfo on Linux; ``platform`` elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def environment_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Versions and hardware that influence the output bits; ``device`` defaults to the current GPU or CPU."""
    dev = _resolve_device(device)
    return {
        "longvid": longvid.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": _package_version("diffusers"),
        "transformers": _package_version("transformers"),
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version(),
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        **_device_info(dev),
        "ffmpeg": _ffmpeg_version(),
    }


def _to_json(obj: Any) -> Any:
    """Turn the odd values a recipe or metrics dict carries into JSON instead of failing after a long run."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, Fraction):
        return float(obj)
    if isinstance(obj, Enum):
        return obj.value
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, small tensors
        return obj.tolist()
    return str(obj)  # torch.dtype, torch.device, ...


def dumps(data: dict[str, Any]) -> str:
    """The sidecar's text: indented, insertion order kept, non-ASCII (prompts) kept readable."""
    return json.dumps(data, indent=2, ensure_ascii=False, default=_to_json) + "\n"


def write_sidecar(path: str | os.PathLike, data: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``data`` as JSON at ``path`` atomically; ``OutputExistsError`` if it exists and not ``overwrite``."""
    path = Path(path)
    check_writable(path, overwrite)
    publish(prepare_sidecar(path, data), path, overwrite=overwrite)
    return path


def prepare_sidecar(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``data`` to a fresh temporary file beside ``path`` (created exclusively, flushed) and return it,
    for the caller to publish together with its video."""
    path = Path(path)
    text = dumps(data)  # serialise first: a failure here leaves no file at all
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with os.fdopen(create_exclusive(tmp), "w", encoding="utf-8") as f:
            f.write(text)
        fsync_file(tmp)
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """Load a sidecar written by ``write_sidecar``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
