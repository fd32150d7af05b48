"""Named, removable hooks on any module, through diffusers' ``HookRegistry`` (never monkeypatching).

Every hook longvid installs has a name ``longvid.<owner>.<what>`` in the module's registry, so it shows up
next to diffusers' own hooks (caching, offload, context parallelism), composes with them, and its removal
restores the module exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook


class ForwardHook(ModelHook):
    """A ``ModelHook`` whose ``new_forward`` is ``fn(module, original_forward, *args, **kwargs)``."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.fn(module, self.fn_ref.original_forward, *args, **kwargs)


class PreForwardHook(ModelHook):
    """A ``ModelHook`` that calls ``fn(module, args, kwargs)`` before the forward; a non-None result
    ``(args, kwargs)`` replaces the inputs (the ``register_forward_pre_hook(with_kwargs=True)`` contract)."""

    def __init__(self, fn: Callable[[torch.nn.Module, tuple, dict], Any]):
        super().__init__()
        self.fn = fn

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        changed = self.fn(module, args, kwargs)
        return changed if changed is not None else (args, kwargs)


def pre_forward_hook(fn: Callable[[torch.nn.Module, tuple, dict], Any]) -> PreForwardHook:
    return PreForwardHook(fn)


def add_hook(module: torch.nn.Module, name: str, hook: ModelHook) -> Callable[[], None]:
    """Register ``hook`` on ``module`` as ``name``; returns the undo, which restores the module exactly."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    return lambda: registry.remove_hook(name, recurse=False)


def replace_forward(module: torch.nn.Module, name: str, fn: Callable) -> Callable[[], None]:
    """Run ``fn(module, original_forward, *args, **kwargs)`` instead of ``module.forward``; returns the undo."""
    return add_hook(module, name, ForwardHook(fn))
