"""The Method protocol: what a long-video method declares and how it attaches to a model.

A method is a small torch-free class (its tensor code lives in ``longvid.core``) with a typed ``Config``
dataclass. It declares the seams it uses, the families it supports and the methods it conflicts with, so
``resolve()`` can report every incompatibility before any weights load. At run time it may

- provide an initial-noise builder (noise seam),
- wrap the denoiser ``denoise(x, t, cond) -> prediction`` (denoiser seam),
- install named, removable hooks / processors on the adapter's attention sites (attention seam).

``apply()`` then ``remove()`` must restore the model bit-exactly; :func:`applied` guarantees ``remove()``
runs even when sampling raises.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterator

Seam = str  # "noise" | "rope" | "attention" | "denoiser" | "stages"


class Method:
    """Base class of every method; subclasses set the class variables and override what they use."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    seams: ClassVar[frozenset[Seam]] = frozenset()
    families: ClassVar[frozenset[str]] = frozenset()
    conflicts: ClassVar[frozenset[str]] = frozenset()
    long_video: ClassVar[bool] = True
    """True when the method lets a model run beyond its native attention length."""
    multi_prompt: ClassVar[bool] = False
    """True when the method accepts a ``{frame: prompt}`` mapping."""

    def __init__(self, config: Any):
        self.config = config
        self._removers: list[Callable[[], None]] = []

    @classmethod
    def check(cls, config: Any, recipe: Any, spec: Any) -> list[tuple[str, str]]:
        """Torch-free cross-field checks: ``[(dotted key, message)]``. Called by ``resolve()``."""
        return []

    def noise_builder(self, adapter: Any) -> Callable | None:
        """An initial-noise builder ``(shape, generator, *, dtype, device, frame_dim) -> Tensor``, or None."""
        return None

    def wrap_denoiser(self, denoise: Callable, adapter: Any, ctx: Any) -> Callable:
        """Return a denoiser with the signature of ``denoise(x, t, cond) -> prediction``; default: unchanged."""
        return denoise

    def apply(self, adapter: Any, ctx: Any) -> None:
        """Install hooks/processors; register each undo with :meth:`on_remove`."""

    def on_remove(self, undo: Callable[[], None]) -> None:
        self._removers.append(undo)

    def remove(self) -> None:
        """Undo everything ``apply()`` installed, last first."""
        while self._removers:
            self._removers.pop()()


@contextlib.contextmanager
def applied(methods: list[Method], adapter: Any, ctx: Any) -> Iterator[list[Method]]:
    """Apply ``methods`` in order; always remove them in reverse order, also on errors."""
    done: list[Method] = []
    try:
        for method in methods:
            done.append(method)
            method.apply(adapter, ctx)
        yield methods
    finally:
        for method in reversed(done):
            method.remove()
