"""Named, removable hooks on any module, through diffusers' ``HookRegistry`` (never monkeypatching)."""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook


class ForwardHook(ModelHook):
    """A ``ModelHook`` whose ``new_forward`` is ``fn(module, original_forward, *args, **kwargs)``."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.fn(module, self.fn_ref.original_forward, *args, **kwargs)


def add_hook(module: torch.nn.Module, name: str, hook: ModelHook) -> Callable[[], None]:
    """Register ``hook`` on ``module`` as ``name``; returns the undo, which restores the module exactly."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    return lambda: registry.remove_hook(name, recurse=False)


def replace_forward(module: torch.nn.Module, name: str, fn: Callable) -> Callable[[], None]:
    """Run ``fn(module, original_forward, *args, **kwargs)`` instead of ``module.forward``; returns the undo."""
    return add_hook(module, name, ForwardHook(fn))
