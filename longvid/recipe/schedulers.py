"""The diffusers scheduler classes and their settings, read from diffusers' source without importing it.

``sampler.scheduler`` must name a diffusers scheduler class and ``sampler.scheduler_config`` may only change
that class's settings: diffusers silently ignores an unknown key, which would make a typo a silent no-op.
Validation is torch-free (``longvid show``/``validate`` never import torch), so instead of importing
diffusers, the class list comes from ``diffusers/schedulers/__init__.py``'s ``_import_structure`` table and a
class's settings from its ``__init__`` signature, both parsed with :mod:`ast`.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path


def _schedulers_dir() -> Path | None:
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "schedulers"


@lru_cache(maxsize=1)
def scheduler_modules() -> dict[str, str]:
    """``{class name: module name}`` of every diffusers scheduler class (``"DDIMScheduler": "scheduling_ddim"``)."""
    folder = _schedulers_dir()
    if folder is None:
        return {}
    tree = ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                and target.value.id == "_import_structure" and isinstance(target.slice, ast.Constant)
                and isinstance(node.value, ast.List)):
            for item in node.value.elts:
                if isinstance(item, ast.Constant) and str(item.value).endswith("Scheduler") \
                        and item.value != "SchedulerMixin":
                    found[item.value] = target.slice.value
    return found


@lru_cache(maxsize=64)
def _methods(name: str) -> dict[str, frozenset[str]] | None:
    """``{method name: parameter names}`` of scheduler class ``name``, from its source; None if not found."""
    module = scheduler_modules().get(name)
    folder = _schedulers_dir()
    if module is None or folder is None:
        return None
    path = folder / f"{module}.py"
    if not path.is_file():
        return None
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and node.name == name:
            found = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    args = item.args
                    found[item.name] = frozenset(a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs))
            return found
    return None


def scheduler_settings(name: str) -> frozenset[str] | None:
    """The ``__init__`` parameter names of scheduler class ``name`` (its config keys), or None if unknown."""
    methods = _methods(name)
    if methods is None or "__init__" not in methods:
        return None
    return methods["__init__"] - {"self"}


def drivable(name: str) -> bool | None:
    """Whether longvid's loop can drive scheduler ``name``: ``set_timesteps(steps, device=...)`` and
    ``step(model_output, timestep, sample, ...)``, as every sampling scheduler of diffusers has (samplers with
    another protocol, such as Karras VE or aMUSEd's masked tokens, do not). None when the source is not found."""
    if scheduler_modules().get(name) == "deprecated":
        return False  # Karras VE, score SDE VP: not samplers of the modern step protocol
    methods = _methods(name)
    if methods is None:
        return None
    step, set_timesteps = methods.get("step"), methods.get("set_timesteps")
    return bool(step and {"model_output", "timestep", "sample"} <= step and set_timesteps)
