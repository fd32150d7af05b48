"""Declarative tables of model families and methods: ``name -> "module:attribute"``, imported lazily.

Adding a model family = a ``longvid/models/<name>.py`` adapter + its :class:`FamilySpec` + one line in
``MODELS``. Adding a method = ``longvid/methods/<name>.py`` + one line in ``METHODS``. Nothing here imports
torch: specs and method classes are torch-free at import time, so ``longvid show`` stays fast.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

#: family -> (torch-free FamilySpec, adapter class)
MODELS: dict[str, tuple[str, str]] = {
    "wan": ("longvid.models.specs:WAN", "longvid.models.wan:WanAdapter"),
    "animatediff": ("longvid.models.specs:ANIMATEDIFF", "longvid.models.animatediff:AnimateDiffAdapter"),
    "pyramid_flow": ("longvid.models.specs:PYRAMID_FLOW", "longvid.models.pyramid_flow.adapter:PyramidFlowAdapter"),
}

#: method name -> Method class (its module must not import torch at import time)
METHODS: dict[str, str] = {
    "freenoise": "longvid.methods.freenoise:FreeNoise",
    "freelong": "longvid.methods.freelong:FreeLong",
    "riflex": "longvid.methods.rope_extrapolation:Riflex",
    "ntk": "longvid.methods.rope_extrapolation:Ntk",
    "pi": "longvid.methods.rope_extrapolation:PositionInterpolation",
    "yarn": "longvid.methods.rope_extrapolation:Yarn",
    "ultravico": "longvid.methods.ultravico:UltraViCo",
    "freeloc": "longvid.methods.freeloc:FreeLoc",
    "freeswim": "longvid.methods.freeswim:FreeSwim",
}


def load_ref(ref: str) -> Any:
    """Import ``"package.module:attribute"``."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def suggest(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def model_spec(family: str):
    return load_ref(MODELS[family][0])


def model_adapter(family: str):
    return load_ref(MODELS[family][1])


def method_class(name: str):
    return load_ref(METHODS[name])
