"""Resolve a recipe: find it, layer it, validate it, and collect every problem into one ``RecipeError``.

Layering, later wins: schema defaults < model-family defaults < recipe YAML < typed CLI options (prompt,
seed, output dir, ...) < ``key=value`` overrides. Values are applied one leaf at a time, so each problem
names the dotted key a user would type (and the override that caused it). Free text (prompts) never goes
through ``key=value``: YAML parsing mangles ``A cat: running``, ``#tag`` and ``007``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from longvid import registry
from longvid.errors import Problem, RecipeError
from longvid.recipe.recipes import find_recipe
from longvid.recipe.schema import Recipe, StageConfig

#: Fields holding free-form mappings: taken whole, never descended into key by key.
_OPEN_FIELDS = {"prompt", "methods", "stages"}
#: Stage names appear in method scopes, progress and checkpoints: plain words only.
_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
#: Free text: only through the YAML or typed CLI options.
_TEXT_KEYS = {"prompt", "negative_prompt", "name", "description"}


def resolve(
    recipe: str | Path | Mapping | None = None,
    overrides: Iterable[str] = (),
    options: Mapping[str, Any] | None = None,
) -> Recipe:
    """Return the validated :class:`Recipe`; raise one :class:`RecipeError` listing every problem.

    Args:
        recipe: a built-in recipe name, a YAML path, an already-loaded mapping, or None (schema only).
        overrides: ``key=value`` strings, applied last, one at a time.
        options: typed values from the CLI or API, by dotted key (``{"prompt": ..., "seed": 7}``).
    """
    problems: list[Problem] = []
    source, data = _load(recipe)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    parsed = _parse_overrides(overrides, problems)

    family = _pick_family(data, options, parsed)
    cfg = OmegaConf.structured(Recipe)
    spec = None
    if family is not None and family in registry.MODELS:
        spec = registry.model_spec(family)
        _apply_tree(cfg, spec.defaults, "", problems, Recipe)
    _apply_tree(cfg, data, "", problems, Recipe)
    for key, value in options.items():
        _set(cfg, key, value, problems)
    for label, tree in parsed:
        _apply_tree(cfg, tree, "", problems, Recipe, label=label)

    # Keep going after merge problems (the bad leaves were not set) so every problem is reported at once.
    # OmegaConf.is_missing does not follow dotted keys (it answers False for "model.path"): ask the parent.
    missing = [key for key in ("model.family", "model.path") if OmegaConf.is_missing(cfg.model, key.split(".")[1])]
    for key in missing:
        hint = "one of " + ", ".join(registry.MODELS) if key == "model.family" else \
            "a hub id, a local directory, or tiny:<family>"
        problems.append(Problem(key, f"required: set {hint}"))
    if missing:
        raise RecipeError(problems, source)

    result: Recipe = OmegaConf.to_object(cfg)
    if not result.name and isinstance(recipe, (str, Path)):
        result.name = Path(str(recipe)).stem
    result.methods = _resolve_methods(result.methods, problems)
    result.stages = _resolve_stages(result.stages, problems)
    from longvid.recipe.validate import validate

    problems.extend(validate(result))
    if problems:
        raise RecipeError(problems, source)
    return result


def to_dict(recipe: Recipe) -> dict:
    """Plain-data form of a resolved recipe (method configs included), for YAML/JSON output."""
    return dataclasses.asdict(recipe)


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(recipe)))


# --------------------------------------------------------------------------------------------- loading


def _load(recipe) -> tuple[str, dict]:
    if recipe is None:
        return "", {}
    if isinstance(recipe, Mapping):
        return "", dict(recipe)
    path = find_recipe(str(recipe))
    try:
        loaded = OmegaConf.load(path)  # a yaml.SafeLoader subclass: no arbitrary objects
    except Exception as err:  # yaml.YAMLError and friends; keep the line/column yaml reports
        raise RecipeError([Problem("", f"not valid YAML: {' '.join(str(err).split())}")], str(path)) from err
    if not isinstance(loaded, DictConfig):
        raise RecipeError([Problem("", "a recipe must be a YAML mapping of keys to values")], str(path))
    data = OmegaConf.to_container(loaded, resolve=False)
    if "longvid_sidecar" in data:  # a video's JSON sidecar: regenerate exactly what it records
        data = data["recipe"]
    return str(path), data


def _parse_overrides(overrides: Iterable[str], problems: list[Problem]) -> list[tuple[str, dict]]:
    parsed = []
    for i, text in enumerate(overrides, 1):
        label = f"override #{i} '{text}'"
        key, sep, _ = text.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(label, "expected key=value, e.g. video.num_frames=81"))
            continue
        if key.split(".")[0] in _TEXT_KEYS:
            flag = {"negative_prompt": "--negative-prompt", "name": "--name"}.get(key, "--prompt / --prompt-at")
            problems.append(Problem(key, f"free text cannot be set with key=value (YAML would mangle it); use {flag}"))
            continue
        try:
            tree = OmegaConf.to_container(OmegaConf.from_dotlist([text]))  # YAML-typed value, split on first '='
        except OmegaConfBaseException as err:
            problems.append(Problem(label, f"cannot parse the value: {_msg(err)}"))
            continue
        parsed.append((label, tree))
    return parsed


def _pick_family(data: dict, options: Mapping, parsed: list[tuple[str, dict]]) -> str | None:
    family = (data.get("model") or {}).get("family") if isinstance(data.get("model"), dict) else None
    family = options.get("model.family", family)
    for _, tree in parsed:
        model = tree.get("model")
        if isinstance(model, dict) and "family" in model:
            family = model["family"]
    return family if isinstance(family, str) else None


# ---------------------------------------------------------------------------------- leaf-wise merging


def _apply_tree(cfg: DictConfig, tree: Mapping, prefix: str, problems: list[Problem], schema: type,
                label: str = "", shown: str = "") -> None:
    """Set every leaf of ``tree`` into ``cfg`` at ``prefix``; unknown keys get a did-you-mean against ``schema``.

    Problems name ``shown + prefix + key``: the dotted path a user types (``shown`` is the path of ``cfg``
    itself inside the recipe, e.g. ``methods.freenoise.`` for a method's own config).
    """
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        where_key = f"{shown}{dotted}"
        if key not in fields:
            where = f" ({label})" if label else ""
            hint = registry.suggest(key, fields) or f"; known: {', '.join(fields)}"
            problems.append(Problem(where_key, f"unknown key{where}{hint}"))
            continue
        sub = hints[key]
        if dataclasses.is_dataclass(sub) and key not in _OPEN_FIELDS:
            if isinstance(value, Mapping):
                _apply_tree(cfg, value, f"{dotted}.", problems, sub, label, shown)
            else:
                names = ", ".join(f.name for f in dataclasses.fields(sub))
                problems.append(Problem(where_key, f"expected a mapping of {names}"))
            continue
        if key in ("methods", "stages") and isinstance(value, Mapping):
            for name, node in value.items():  # merge per entry so two layers of one method combine
                _set(cfg, f"{dotted}.{name}", node, problems, label, shown)
            continue
        _set(cfg, dotted, value, problems, label, shown)


def _set(cfg: DictConfig, key: str, value: Any, problems: list[Problem], label: str = "", shown: str = "") -> None:
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as err:
        where = f" ({label})" if label else ""
        problems.append(Problem(f"{shown}{key}", f"{_msg(err)}{where}"))


def _msg(err: OmegaConfBaseException) -> str:
    """OmegaConf's message without its multi-line ``full_key/object_type`` trailer."""
    text = getattr(err, "msg", None) or str(err)
    return " ".join(text.split("\n")[0].split())


# ------------------------------------------------------------------------------------------- methods


def _resolve_methods(methods: Mapping[str, Any], problems: list[Problem]) -> dict[str, Any]:
    """Turn ``{name: mapping}`` into ``{name: MethodConfig}``; ``null`` disables a method."""
    out: dict[str, Any] = {}
    for name, node in (methods or {}).items():
        key = f"methods.{name}"
        if node is None:
            continue
        if name not in registry.METHODS:
            problems.append(Problem(key, f"unknown method{registry.suggest(name, registry.METHODS)}; "
                                         f"known: {', '.join(registry.METHODS) or 'none'}"))
            continue
        config = _structured(key, node, registry.method_class(name).Config, problems)
        if config is not None:
            out[name] = config
    return out


def _resolve_stages(stages: Mapping[str, Any], problems: list[Problem]) -> dict[str, StageConfig]:
    """Turn ``{name: mapping}`` into an ordered ``{name: StageConfig}``; ``null`` drops a stage."""
    out: dict[str, StageConfig] = {}
    for name, node in (stages or {}).items():
        key = f"stages.{name}"
        if node is None:
            continue
        if not _STAGE_NAME.fullmatch(str(name)):
            problems.append(Problem(key, "a stage name uses letters, digits, '-' and '_' only (e.g. base, refine)"))
            continue
        config = _structured(key, node, StageConfig, problems)
        if config is not None:
            out[str(name)] = config
    return out


def _structured(key: str, node: Any, config_cls: type, problems: list[Problem]) -> Any:
    """A mapping (``{}``/``true`` for the defaults) as a ``config_cls`` instance, or None after adding problems."""
    if node is True:
        node = {}
    if not isinstance(node, (Mapping, DictConfig)):
        problems.append(Problem(key, "expected a mapping of settings ({} for the defaults) or null"))
        return None
    cfg = OmegaConf.structured(config_cls)
    before = len(problems)
    tree = OmegaConf.to_container(node) if isinstance(node, DictConfig) else dict(node)
    _apply_tree(cfg, tree, "", problems, config_cls, shown=f"{key}.")
    if len(problems) > before:
        return None
    try:
        return OmegaConf.to_object(cfg)
    except (ValueError, OmegaConfBaseException) as err:  # __post_init__ range checks
        problems.append(Problem(key, str(err) if isinstance(err, ValueError) else _msg(err)))
        return None

