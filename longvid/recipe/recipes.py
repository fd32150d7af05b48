"""Finding recipes: an existing path wins; otherwise a built-in name, with or without ``.yaml``.

Built-in recipes are the YAML files under the repository's ``configs/`` folder, installed as the package
``longvid.configs`` so that ``--recipe freelong-128`` works after a normal (non-editable) install too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from longvid import registry
from longvid.errors import Problem, RecipeError


def builtin_dir() -> Path:
    """The folder holding the built-in recipes (inside the installed package, or the source checkout)."""
    try:
        return Path(str(resources.files("longvid.configs")))
    except ModuleNotFoundError:  # imported from a source checkout that shadows the installed package
        return Path(__file__).resolve().parents[2] / "configs"


def builtin_recipes() -> dict[str, Path]:
    """``{name: path}`` of every built-in recipe, found recursively."""
    root = builtin_dir()
    return {p.stem: p for p in sorted(root.rglob("*.yaml"))}


def find_recipe(ref: str) -> Path:
    """Resolve a ``--recipe`` argument to a file, or raise a one-line ``RecipeError``."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    builtins = builtin_recipes()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if name in builtins:
        return builtins[name]
    raise RecipeError([Problem("recipe", f"no file '{ref}' and no built-in recipe '{name}'"
                                         f"{registry.suggest(name, builtins)}; see `longvid recipes`")])


def recipe_header(path: Path) -> str:
    """A recipe's one-line description: its ``description`` key, else its first comment line."""
    from omegaconf import OmegaConf

    try:
        description = OmegaConf.load(path).get("description")
    except Exception:  # an invalid recipe still gets listed; `longvid validate` reports it
        description = None
    if description:
        return str(description)
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text:
            return text
    return ""
