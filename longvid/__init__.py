"""longvid: long and high-resolution video generation with existing video diffusion models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover - typing only; importing longvid must stay torch-free
    from pathlib import Path

    from longvid.recipe.schema import Recipe
    from longvid.runner import Result


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
) -> "Result":
    """Resolve ``recipe`` and generate it; the Python twin of ``longvid generate``.

    Args:
        recipe: a built-in recipe name, a YAML (or sidecar JSON) path, a mapping, or a resolved ``Recipe``.
        overrides: ``key=value`` strings, as on the command line (``["video.num_frames=33"]``).
        prompt, negative_prompt, seed, out_dir, name, overwrite: typed options (``--prompt`` ...).
        options: further typed values by dotted key (``{"sampler.steps": 4}``).
        write: write the MP4 and its JSON sidecar (False: latents only).
        progress: ``progress(event, done, total)`` callback.

    Returns:
        a ``Result`` with ``.path`` (the MP4, or None), ``.latents`` and ``.sidecar``.

    Example:
        >>> result = longvid.generate("demo", ["sampler.steps=4"], prompt="a red fox", seed=7)  # doctest: +SKIP
    """
    import dataclasses

    from longvid.recipe.resolve import resolve
    from longvid.recipe.schema import Recipe

    from longvid.runner import generate as run  # torch is imported here, not by ``import longvid``

    if isinstance(recipe, Recipe):
        recipe = dataclasses.asdict(recipe)
    typed = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "output.dir": out_dir,
             "output.name": name, "output.overwrite": overwrite, **(options or {})}
    return run(resolve(recipe, list(overrides), typed), write=write, progress=progress)
