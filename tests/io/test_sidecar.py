"""Sidecar JSON: round trip, order, atomic write, overwrite rules, environment info."""

from __future__ import annotations

import importlib.util
import json
import platform
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import longvid
from longvid.errors import OutputExistsError
from longvid.io import sidecar
from longvid.io.sidecar import environment_info, read_sidecar, sidecar_path, write_sidecar


def source_version(package: str) -> str:
    """``__version__`` from the package's ``__init__.py`` without importing it (diffusers takes seconds)."""
    init = Path(importlib.util.find_spec(package).origin).read_text(encoding="utf-8")
    return re.search(r'^__version__\s*=\s*"([^"]+)"', init, re.M).group(1)


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_sidecar_path_swaps_the_suffix(tmp_path):
    assert sidecar_path(tmp_path / "cat.v2.mp4") == tmp_path / "cat.v2.json"
    assert sidecar_path("out/dump.mkv") == Path("out/dump.json")


def test_round_trip_keeps_values_and_insertion_order(tmp_path):
    data = {"zeta": 1, "alpha": {"seed": 42, "prompt": "un chat 🐱 sur un toit"}, "list": [1.5, None, True]}
    path = write_sidecar(tmp_path / "a.json", data)
    assert read_sidecar(path) == data
    text = path.read_text(encoding="utf-8")
    assert list(json.loads(text)) == ["zeta", "alpha", "list"]  # not sorted
    assert text.startswith('{\n  "zeta": 1')  # indent 2
    assert "🐱" in text  # readable, not \\u escapes
    assert listing(tmp_path) == ["a.json"]  # no temporary file left


def test_odd_values_are_serialised(tmp_path):
    data = {"path": tmp_path / "x.mp4", "fps": Fraction(24000, 1001), "np": np.float32(0.5),
            "arr": np.arange(3), "t": torch.tensor(2.0), "dtype": torch.bfloat16}
    back = read_sidecar(write_sidecar(tmp_path / "b.json", data))
    assert back == {"path": str(tmp_path / "x.mp4"), "fps": pytest.approx(23.976, abs=1e-3), "np": 0.5,
                    "arr": [0, 1, 2], "t": 2.0, "dtype": "torch.bfloat16"}


def test_existing_sidecar_needs_overwrite(tmp_path):
    path = tmp_path / "c.json"
    write_sidecar(path, {"v": 1})
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_sidecar(path, {"v": 2})
    assert read_sidecar(path) == {"v": 1}
    write_sidecar(path, {"v": 3}, overwrite=True)
    assert read_sidecar(path) == {"v": 3}
    assert listing(tmp_path) == ["c.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "d.json"
    write_sidecar(path, {"v": 1})

    def broken_fsync(p):
        raise OSError("disk full")

    monkeypatch.setattr(sidecar, "fsync_file", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_sidecar(path, {"v": 2}, overwrite=True)
    assert read_sidecar(path) == {"v": 1}
    assert listing(tmp_path) == ["d.json"]


def test_environment_info_has_real_versions():
    info = environment_info()
    expected = {"longvid", "python", "platform", "torch", "diffusers", "transformers", "cuda", "cudnn",
                "device", "device_name", "gpu_total_memory_bytes", "ffmpeg"}
    assert expected <= set(info)
    assert info["longvid"] == longvid.__version__
    assert info["python"] == platform.python_version()
    assert info["torch"] == torch.__version__
    assert info["diffusers"] == source_version("diffusers")
    assert info["transformers"] == source_version("transformers")
    assert info["cuda"] == torch.version.cuda
    assert isinstance(info["ffmpeg"], str) and info["ffmpeg"][:1] in "nv0123456789"
    assert info["device_name"]
    json.dumps(info)  # must go into the sidecar as is


def test_environment_info_cpu_device():
    info = environment_info("cpu")
    assert info["device"] == "cpu"
    assert info["gpu_total_memory_bytes"] is None
    assert isinstance(info["device_name"], str) and info["device_name"]

