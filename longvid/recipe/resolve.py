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
_TEXT_KEYS = {"prompt", "negative_prompt", "name", "description", "image"}


def resolve(
    recipe: str | Path | Mapping | None = None,
    overrides: Iterable[str] = (),
    options: Mapping[str, Any] | None = None,
    *,
    interpolate: bool = False,
) -> Recipe:
    """Return the validated :class:`Recipe`; raise one :class:`RecipeError` listing every problem.

    Args:
        recipe: a built-in recipe name, a YAML path, a sidecar JSON, an already-loaded mapping, or None.
        overrides: ``key=value`` strings, applied last, one at a time.
        options: typed values from the CLI or API, by dotted key (``{"prompt": ..., "seed": 7}``).
        interpolate: evaluate OmegaConf interpolations (``${oc.env:HOME}``, ``${video.width}``) in recipe
            values (``--interpolate``). Off, one is refused. Free text (prompts, names) is never evaluated.
    """
    problems: list[Problem] = []
    source, data = _load(recipe)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    parsed = _parse_overrides(overrides, problems)
    # Free text never goes through OmegaConf (which would evaluate "${...}" in it): set after structuring.
    text = {key: data.pop(key) for key in list(data) if key in _TEXT_KEYS}
    text.update({key: options.pop(key) for key in list(options) if key in _TEXT_KEYS})
    interpolations = [] if interpolate else (
        _interpolations(data, "") + [p for k, v in options.items() for p in _interpolations(v, k)]
        + [p for label, tree in parsed for p in _interpolations(tree, "", label)])
    problems += interpolations

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
    if missing or interpolations:  # an unevaluated interpolation cannot be structured: stop here
        raise RecipeError(problems, source)

    try:
        result: Recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # an opted-in interpolation that does not resolve
        raise RecipeError(problems + [Problem("", f"cannot evaluate an interpolation: {_msg(err)}")], source) from None
    for key, value in text.items():
        problem = _text_problem(key, value)
        if problem is None:
            if key == "prompt" and isinstance(value, Mapping):
                value = _prompt_keys(value)[0]
            if key == "image":  # a path or nothing: empty means none
                value = value or None
            setattr(result, key, value if key == "image" else ("" if value is None else value))
        else:
            problems.append(problem)
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


#: Sidecar keys that place the output: a sidecar regenerates content; where it goes is the command line's.
_PLACEMENT = ("dir", "name", "overwrite")


def _load(recipe) -> tuple[str, dict]:
    if recipe is None:
        return "", {}
    if isinstance(recipe, Mapping):
        return "", dict(recipe)
    path = find_recipe(str(recipe))
    try:
        loaded = OmegaConf.load(path)  # a yaml.SafeLoader subclass: no arbitrary objects
    except Exception as err:  # yaml.YAMLError, UnicodeDecodeError, ...; keep the line/column yaml reports
        what = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise RecipeError([Problem("", f"not valid {what}: {' '.join(str(err).split())[:300]}")], str(path)) from None
    if not isinstance(loaded, DictConfig):
        raise RecipeError([Problem("", "a recipe must be a YAML mapping of keys to values")], str(path))
    data = OmegaConf.to_container(loaded, resolve=False)
    if "longvid_sidecar" in data:  # a video's JSON sidecar: regenerate exactly what it records
        return str(path), _sidecar_recipe(data, str(path))
    if path.suffix.lower() == ".json":
        raise RecipeError([Problem("", "not a longvid sidecar (no longvid_sidecar key); recipes are YAML files")],
                          str(path))
    return str(path), data


def _sidecar_recipe(data: dict, source: str) -> dict:
    """The recipe a sidecar records, without its output placement (``output.dir/name/overwrite``): those come
    from the command line, so a shared sidecar can neither overwrite the original video nor aim elsewhere."""
    recipe = data.get("recipe")
    if data.get("longvid_sidecar") != 1 or not isinstance(recipe, dict):
        raise RecipeError([Problem("recipe", "this sidecar holds no recipe mapping (longvid_sidecar: 1 and a "
                                             "recipe: {...} are needed); regenerate it with longvid")], source)
    recipe = dict(recipe)
    if isinstance(recipe.get("output"), dict):
        recipe["output"] = {k: v for k, v in recipe["output"].items() if k not in _PLACEMENT}
    return recipe


def _interpolations(tree: Any, prefix: str, label: str = "") -> list[Problem]:
    """A problem for every string holding an OmegaConf interpolation (``${...}``) in a recipe tree."""
    if isinstance(tree, Mapping):
        return [p for k, v in tree.items() for p in _interpolations(v, f"{prefix}.{k}" if prefix else str(k), label)]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in _interpolations(v, f"{prefix}[{i}]", label)]
    if isinstance(tree, str) and "${" in tree:
        where = f" ({label})" if label else ""
        return [Problem(prefix, f"{tree!r} is an interpolation, which recipes do not evaluate{where}; write the "
                                f"value itself, or pass --interpolate to evaluate it")]
    return []


def _prompt_keys(value: Mapping) -> tuple[dict[int, Any] | None, Problem | None]:
    """A ``{frame: prompt}`` mapping with integer keys (YAML gives ints, a JSON sidecar strings): ``"16"`` and
    16 are the same frame, so both at once is refused rather than one silently dropped."""
    out: dict[int, Any] = {}
    for key, text in value.items():
        try:
            frame = int(str(key).strip()) if not isinstance(key, bool) else None
        except ValueError:
            frame = None
        if frame is None:
            return None, Problem("prompt", f"multi-prompt keys must be frame numbers, got {key!r}")
        if frame in out:
            return None, Problem("prompt", f"frame {frame} has two prompts (keys {frame} and '{frame}')")
        out[frame] = text
    return out, None


def _text_problem(key: str, value: Any) -> Problem | None:
    """Free text must be text (a multi-prompt mapping for ``prompt``): YAML turns ``007`` into 7, ``no`` into
    False and an empty value into null, so those are refused with how to write them."""
    if value is None or isinstance(value, str):
        return None
    if key == "prompt" and isinstance(value, Mapping):
        return _prompt_keys(value)[1]  # {frame: prompt}; validate() checks frames and values
    return Problem(key, f"expected text, got {type(value).__name__} {value!r}; quote it in YAML "
                        f"('{key}: \"...\"') or use the command-line option")


def _parse_overrides(overrides: Iterable[str], problems: list[Problem]) -> list[tuple[str, dict]]:
    parsed = []
    for i, text in enumerate(overrides, 1):
        label = f"override #{i} '{text}'"
        key, sep, _ = text.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(label, "expected key=value, e.g. video.num_frames=81"))
            continue
        if key == "output.name":
            problems.append(Problem(key, "a name template cannot be set with key=value (YAML reads {x} as a "
                                         "mapping); use --name"))
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

