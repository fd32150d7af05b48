"""Contracts over the registry: every method on every model it supports, so a new method or model family is
checked the moment it gets its registry line.

- it runs (finite latents that differ from vanilla at twice the native length);
- with its identity settings at the native length it is exactly vanilla;
- apply -> remove restores the model bit-exactly (processors, hooks, outputs);
- two methods either fail at resolve, naming both, or run together: conflicts are never found at apply time;
- one loaded model serves every built-in recipe of its load key exactly as a fresh load does.
"""

import itertools

import pytest
import torch

from longvid import registry, runner
from longvid.core.context import GenerationContext
from longvid.errors import MethodError, RecipeError
from longvid.methods.base import applied
from longvid.models.base import LOAD_KEYS, load_key
from longvid.models.specs import TINY_VARIANTS
from longvid.recipe.recipes import builtin_recipes
from longvid.recipe.resolve import resolve

SIZE = {"wan": (32, 64), "animatediff": (32, 32)}  # TI2V-5B's 16x VAE and 2x2 patch need widths of 32k


def _mapping(variant: str, frames: int, methods=None) -> dict:
    family = TINY_VARIANTS[variant]
    h, w = SIZE[family]
    return {"model": {"family": family, "path": f"tiny:{variant}"}, "prompt": "a red fox", "negative_prompt": "blur",
            "video": {"num_frames": frames, "height": h, "width": w},
            "sampler": {"steps": 2, "max_sequence_length": 16}, "seed": 1, "runtime": {"device": "cpu"},
            "methods": methods or {}}


def _long(spec) -> int:
    return spec.native_frames * 2 - 1 if spec.temporal_stride > 1 else spec.native_frames * 2  # 161 / 32


PAIRS = [(m, v) for m in registry.METHODS for v, fam in TINY_VARIANTS.items()
         if fam in registry.method_class(m).families]


@pytest.fixture(scope="module")
def adapters():
    loaded = {}
    yield lambda variant: loaded.setdefault(variant, runner.load_adapter(resolve(_mapping(variant, 1))))
    for adapter in loaded.values():
        adapter.close()


def _run(adapter, mapping):
    return runner.generate(resolve(mapping), adapter=adapter, write=False).latents


def _model_state(adapter):
    """What a method may touch: every attention processor and every named diffusers hook."""
    procs = {s.name: s.module.processor for s in adapter.attention_sites()}
    hooks = {}
    for component, root in adapter.pipe.components.items():
        if isinstance(root, torch.nn.Module):
            for name, module in root.named_modules(prefix=component):
                order = list(getattr(getattr(module, "_diffusers_hook", None), "_hook_order", []))
                if order:  # an emptied registry left behind is harmless: it forwards to the module itself
                    hooks[name] = order
    return procs, hooks


@pytest.mark.parametrize("method, variant", PAIRS)
def test_runs_identity_is_vanilla_and_remove_restores(method, variant, adapters):
    adapter = adapters(variant)
    spec = registry.model_spec(TINY_VARIANTS[variant])
    cls = registry.method_class(method)
    before = _model_state(adapter)
    native = _mapping(variant, spec.native_frames if spec.temporal_stride > 1 else spec.native_frames)
    vanilla_native = _run(adapter, native)
    identity = _run(adapter, dict(native, methods={method: cls.identity_settings(spec)}))
    assert torch.equal(identity, vanilla_native)

    long = _mapping(variant, _long(spec))
    with_method = _run(adapter, dict(long, methods={method: cls.active_settings(spec)}))
    assert torch.isfinite(with_method).all()
    vanilla_long = _run(adapter, long) if not spec.max_frames or _long(spec) <= spec.max_frames else None
    if vanilla_long is not None:
        assert (with_method - vanilla_long).abs().max() > 1e-4  # the method does something at 2x length
    assert _model_state(adapter) == before  # every processor and hook is back
    assert torch.equal(_run(adapter, native), vanilla_native)  # and the outputs are the vanilla ones, bit for bit


FAMILY_PAIRS = [(a, b, family) for family in registry.MODELS for a, b in itertools.combinations(registry.METHODS, 2)
                if family in registry.method_class(a).families and family in registry.method_class(b).families]


@pytest.mark.parametrize("a, b, family", FAMILY_PAIRS)
def test_conflicts_are_found_at_resolve_never_at_apply(a, b, family, adapters):
    spec = registry.model_spec(family)
    variant = next(v for v, f in TINY_VARIANTS.items() if f == family)
    settings = {"wan": [{}, {"fusion": "none"}], "animatediff": [{}, {"fusion": "layer"}, {"fusion": "none"}]}
    for extra in settings[family]:
        methods = {a: dict(extra) if a == "freenoise" else {}, b: dict(extra) if b == "freenoise" else {}}
        mapping = _mapping(variant, _long(spec), methods)
        try:
            recipe = resolve(mapping)
        except RecipeError as err:
            assert f"methods.{a}" in str(err) and f"methods.{b}" in str(err) or any(
                f"methods.{a}" in p.key and b in p.message or f"methods.{b}" in p.key and a in p.message
                for p in err.problems), str(err)
            continue
        adapter = adapters(variant)
        ctx = GenerationContext(1, 1, 1, 1, 1, 1, total_steps=1)
        try:
            with applied(runner.build_methods(recipe), adapter, ctx):
                pass
        except MethodError as err:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"{a} + {b} ({extra}) passed resolve but conflict at apply: {err}")


def _tiny_version(name: str) -> list[str]:
    """Overrides that run built-in recipe ``name`` on its family's tiny model in seconds, keeping its methods,
    stages and frame counts."""
    recipe = resolve(name)
    family = recipe.model.family
    h, w = {"wan": (32, 64), "animatediff": (16, 16), "pyramid_flow": (64, 64)}[family]
    overrides = [f"model.path=tiny:{family}", "model.motion_adapter=null", f"video.height={h}", f"video.width={w}",
                 "sampler.steps=2", "sampler.max_sequence_length=16", "runtime.device=cpu"]
    longest = {"wan": 161, "animatediff": 40, "pyramid_flow": 25}[family]  # fewer frames than the recipe
    if recipe.video.num_frames > longest:
        overrides.append(f"video.num_frames={longest}")
    for stage in list(recipe.stages)[:-1]:
        overrides += [f"stages.{stage}.height={h // 2}", f"stages.{stage}.width={w // 2}"]
    if family == "pyramid_flow":  # the image unit's 20 + 20 + 20 steps: one each is enough here
        overrides.append("model.options.image_steps=[1,1,1]")
    if recipe.output.crop is not None:  # a 1080-row crop of a 32-row tiny video
        overrides.append("output.crop=null")
    if "freeloc" in recipe.methods:  # the tiny model has no layer preset (a real one is built in or probed)
        overrides.append("methods.freeloc.tsa_layers=[0]")
    return overrides


def test_a_shared_model_equals_a_fresh_load_for_every_builtin_recipe_of_its_load_key():
    groups: dict[tuple, list[str]] = {}
    for name in builtin_recipes():
        recipe = resolve(name)
        key = tuple(load_key(recipe)[k] for k in LOAD_KEYS)
        groups.setdefault(key, []).append(name)
    shared_groups = [names for names in groups.values() if len(names) > 1]
    assert {len(names) for names in shared_groups} and sum(map(len, shared_groups)) >= 6
    for names in shared_groups:
        recipes = [resolve(n, _tiny_version(n)) for n in names]
        adapter = runner.load_adapter(recipes[0])
        try:
            shared = [runner.generate(r, adapter=adapter, write=False).latents for r in recipes]
        finally:
            adapter.close()
        for name, recipe, latents in zip(names, recipes, shared):
            fresh = runner.generate(recipe, write=False).latents
            assert torch.equal(latents, fresh), name
