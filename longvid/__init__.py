"""longvid: long and high-resolution video generation with existing video diffusion models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover - typing only; importing longvid must stay torch-free
    from pathlib import Path

    from longvid.recipe.schema import Recipe
    from longvid.runner import Result
    from longvid.models.base import ModelAdapter


def generate(
    recipe: "str | Path | Mapping | Recipe",
    overrides: Iterable[str] = (),
    *,
    prompt: str | Mapping[int, str] | None = None,
    negative_prompt: str | None = None,
    seed: int | None = None,
    out_dir: str | None = None,
    name: str | None = None,
    overwrite: bool | None = None,
    options: Mapping[str, Any] | None = None,
    write: bool = True,
    progress=None,
    restart: bool = False,
) -> "Result":
    """Resolve ``recipe`` and generate it; the Python twin of ``longvid generate``.

    Args:
        recipe: a built-in recipe name, a YAML (or sidecar JSON) path, a mapping, or a resolved ``Recipe``.
        overrides: ``key=value`` strings, as on the command line (``["video.num_frames=33"]``).
        prompt, negative_prompt, seed, out_dir, name, overwrite: typed options (``--prompt`` ...).
        options: further typed values by dotted key (``{"sampler.steps": 4}``).
        write: write the MP4 and its JSON sidecar (False: latents only).
        progress: ``progress(event, done, total)`` callback.
        restart: discard a checkpoint of this output instead of resuming it (``--restart``).

    Returns:
        a ``Result`` with ``.path`` (the MP4, or None), ``.latents`` and ``.sidecar``.

    Example:
        >>> result = longvid.generate("demo", ["sampler.steps=4"], prompt="a red fox", seed=7)  # doctest: +SKIP
    """
    from longvid.runner import generate as run  # torch is imported here, not by ``import longvid``

    resolved = _resolve(recipe, overrides, prompt, negative_prompt, seed, out_dir, name, overwrite, options)
    return run(resolved, write=write, progress=progress, restart=restart)


def load(recipe: "str | Path | Mapping | Recipe", overrides: Iterable[str] = ()) -> "Model":
    """Load the model of ``recipe`` once, for many runs: ``load("wan-t2v-1.3b").generate("freelong-wan-4x", ...)``.

    Only the recipe's load key is used (``model.*``, ``runtime.device``, ``runtime.offload``); each
    ``Model.generate`` reads every other setting from its own recipe, so a shared model gives exactly what a
    fresh load would.
    """
    from longvid.runner import load_adapter

    return Model(load_adapter(_resolve(recipe, overrides)))


class Model:
    """A loaded model serving many generations; a context manager (``close()`` removes longvid's hooks)."""

    def __init__(self, adapter: "ModelAdapter"):
        self.adapter = adapter

    def generate(self, recipe, overrides: Iterable[str] = (), *, prompt=None, negative_prompt=None, seed=None,
                 out_dir=None, name=None, overwrite=None, options=None, write: bool = True, progress=None,
                 restart: bool = False) -> "Result":
        """:func:`longvid.generate` on this model; a recipe with another load key is refused (exit 2 style)."""
        from longvid.runner import generate as run

        resolved = _resolve(recipe, overrides, prompt, negative_prompt, seed, out_dir, name, overwrite, options)
        return run(resolved, adapter=self.adapter, write=write, progress=progress, restart=restart)

    def close(self) -> None:
        self.adapter.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _resolve(recipe, overrides=(), prompt=None, negative_prompt=None, seed=None, out_dir=None, name=None,
             overwrite=None, options=None) -> "Recipe":
    import dataclasses

    from longvid.recipe.resolve import resolve
    from longvid.recipe.schema import Recipe

    if isinstance(recipe, Recipe):
        recipe = dataclasses.asdict(recipe)
    typed = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "output.dir": out_dir,
             "output.name": name, "output.overwrite": overwrite, **(options or {})}
    return resolve(recipe, list(overrides), typed)
