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


#: Suffixes that make a ``--recipe`` argument a path, never a built-in name.
PATH_SUFFIXES = (".yaml", ".yml", ".json")


def looks_like_path(ref: str) -> bool:
    """A path separator, a recipe file suffix, or an existing folder: the user means a file, not a name."""
    return ("/" in ref or "\\" in ref or ref.startswith("~") or ref.lower().endswith(PATH_SUFFIXES)
            or Path(ref).expanduser().is_dir())


def find_recipe(ref: str) -> Path:
    """Resolve a ``--recipe`` argument to a file, or raise a one-line ``RecipeError``.

    A built-in name (``freelong-128``) finds the built-in recipe; anything that looks like a path must exist
    as a file, so a mistyped path never silently runs the built-in recipe of the same name.
    """
    path = Path(ref).expanduser()
    builtins = builtin_recipes()
    if looks_like_path(ref):
        if path.is_file():
            return path
        what = "is a folder, not a recipe file" if path.is_dir() else "does not exist"
        stem = path.name.removesuffix(".yaml").removesuffix(".yml").removesuffix(".json")
        hint = f"; the built-in recipe is --recipe {stem}" if stem in builtins and not path.is_dir() else ""
        raise RecipeError([Problem("recipe", f"'{ref}' {what}{hint}")])
    if path.is_file():  # an existing file wins over a built-in of the same name
        return path
    if ref in builtins:
        return builtins[ref]
    raise RecipeError([Problem("recipe", f"no built-in recipe '{ref}'{registry.suggest(ref, builtins)} and no file "
                                         f"of that name; see `longvid recipes`")])


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
