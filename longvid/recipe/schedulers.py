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
def scheduler_settings(name: str) -> frozenset[str] | None:
    """The ``__init__`` parameter names of scheduler class ``name`` (its config keys), or None if unknown."""
    module = scheduler_modules().get(name)
    folder = _schedulers_dir()
    if module is None or folder is None:
        return None
    path = folder / f"{module}.py"
    if not path.is_file():
        return None
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and node.name == name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args
                    return frozenset(a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)) - {"self"}
    return None
