"""The Method protocol: what a long-video method declares and how it attaches to a model.

A method is a small torch-free class (its tensor code lives in ``longvid.core``) with a typed ``Config``
dataclass (a :class:`MethodConfig`, so every method can be scoped to stages). It declares the seams it uses,
the families it supports, the methods it conflicts with and the attention-site kinds it patches, so
``resolve()`` can report every incompatibility before any weights load. At run time it may

- provide an initial-noise builder (noise seam),
- wrap the denoiser ``denoise(x, t, cond) -> prediction`` (denoiser seam),
- install named, removable hooks / processors on the adapter's attention sites (attention seam).

``apply()`` then ``remove()`` must restore the model bit-exactly; :func:`applied` guarantees ``remove()``
runs even when sampling raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, List, Optional

Seam = str  # "noise" | "rope" | "attention" | "denoiser" | "stages"


@dataclass
class MethodConfig:
    """Settings every method has; a method's own ``Config`` subclasses this."""

    stages: Optional[List[str]] = None
    """Names of the recipe's stages this method applies in (``[refine]``). None = every stage."""


class Method:
    """Base class of every method; subclasses set the class variables and override what they use."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig
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

    @classmethod
    def patched_sites(cls, config: Any, spec: Any) -> frozenset[str]:
        """The attention-site kinds (``temporal``, ``spatial``, ``full``, ``cross``) whose processors or blocks
        this configuration replaces on a model of ``spec``. Two methods patching a common kind in a common
        stage conflict (one attention method per site); ``resolve()`` reports the pair."""
        return frozenset()

    @classmethod
    def identity_settings(cls, spec: Any) -> dict[str, Any]:
        """Settings under which the method is exactly vanilla on a native-length, native-size video of ``spec``
        (the contract tests check it). Long-video methods whose windows default to the native length need none."""
        return {}

    @classmethod
    def active_settings(cls, spec: Any) -> dict[str, Any]:
        """Settings under which the method visibly acts on a 2x-native-length video of ``spec`` (the contract
        tests check it does). Most methods act with their defaults; a gated one may need its gate opened."""
        return {}

    @classmethod
    def window_bounds(cls, config: Any, num_frames: int, spec: Any) -> list[int]:
        """Latent frames where this configuration's temporal windows begin or end (0 < frame < latent length) in a
        stage of ``num_frames`` video frames:
        where a window seam may show. The sidecar lists them as pixel frames for ``longvid metrics``' seam score.
        Methods without hard temporal windows (soft blends, tiers, spatial windows) have none."""
        return []

    def noise_builder(self, adapter: Any) -> Callable | None:
        """An initial-noise builder ``(shape, generator, *, dtype, device, frame_dim) -> Tensor``, or None."""
        return None

    def wrap_denoiser(self, denoise: Callable, adapter: Any, ctx: Any) -> Callable:
        """Return a denoiser with the signature of ``denoise(x, t, cond) -> prediction``; default: unchanged."""
        return denoise

    def apply(self, adapter: Any, ctx: Any) -> None:
        """Install hooks/processors; register each undo with :meth:`on_remove`."""

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(tensors, plain data)`` a checkpoint must keep so a resumed run continues bit-identically; the
        methods shipped so far derive everything from the step, so the default is empty."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, Any], data: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called after :meth:`apply`)."""

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
