"""Cross-field checks on a typed recipe, before any weights load. Each returns :class:`Problem`s."""

from __future__ import annotations

from pathlib import Path

import re

from longvid import registry
from longvid.errors import Problem
from longvid.recipe.schema import Recipe


def _check_crop(recipe: Recipe) -> list[Problem]:
    crop, video = list(recipe.output.crop), recipe.video
    if len(crop) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in crop):
        return [Problem("output.crop", f"must be [height, width] in pixels, got {crop}")]
    if recipe.output.codec != "ffv1" and any(x % 2 for x in crop):
        return [Problem("output.crop", f"{recipe.output.codec} needs even sizes (4:2:0 chroma), got {crop}")]
    if video.height is not None and video.width is not None and (crop[0] > video.height or crop[1] > video.width):
        return [Problem("output.crop", f"{crop} is larger than the video ({video.height}x{video.width})")]
    return []


def validate(recipe: Recipe) -> list[Problem]:
    """Every problem of a merged recipe: family rules, ranges, prompts, methods and their conflicts."""
    problems: list[Problem] = []
    family = recipe.model.family
    if family not in registry.MODELS:
        return [Problem("model.family", f"unknown model family '{family}'{registry.suggest(family, registry.MODELS)}; "
                                        f"known: {', '.join(registry.MODELS)}")]
    spec = registry.model_spec(family)
    required = _check_required(recipe)
    if required:  # the rules below need these numbers
        return required + _check_model(recipe)
    problems += _check_model(recipe)
    problems += _check_family(recipe, spec)
    problems += _check_limits(recipe)
    problems += _check_output(recipe)
    problems += _check_schedulers(recipe, spec)
    problems += _check_video(recipe, spec)
    problems += _check_ranges(recipe)
    problems += _check_prompt(recipe)
    problems += _check_stages(recipe, spec)
    problems += _check_methods(recipe, spec)
    return problems


#: Keys the model family fills in; ``null`` in a recipe removes the family's value, which leaves nothing to run.
_REQUIRED = ("video.num_frames", "video.height", "video.width", "video.fps", "sampler.steps",
             "sampler.guidance_scale", "sampler.max_sequence_length")

#: Upper bounds of values that would exhaust memory or time, with the reason (``runtime.limits=false`` lifts them).
LIMITS = {
    "video.num_frames": (2049, "frames: 8x Wan's native length and more"),
    "video.height": (4096, "pixels: above 4K"),
    "video.width": (4096, "pixels: above 4K"),
    "video.fps": (240, "frames per second"),
    "sampler.steps": (1000, "steps: the length of the training schedule"),
    "sampler.max_sequence_length": (4096, "text tokens"),
    "runtime.decode_chunk": (1024, "frames per decode batch"),
    "runtime.threads": (1024, "threads"),
}
#: The generator's seed range: torch.Generator.manual_seed takes a 64-bit unsigned integer.
MAX_SEED = 2**64 - 1
#: diffusers' attention backends (``AttentionBackendName`` of the pinned minor version; a test keeps them equal), so
#: ``runtime.attention_backend`` is checked without importing torch.
ATTENTION_BACKENDS = ("flash", "flash_hub", "flash_varlen", "flash_varlen_hub", "flash_4_hub", "_flash_3",
                      "_flash_varlen_3", "_flash_3_hub", "_flash_3_varlen_hub", "aiter_fa2_hub", "flex", "native",
                      "_native_cudnn", "_native_efficient", "_native_flash", "_native_math", "_native_npu",
                      "_native_xla", "sage", "sage_hub", "sage_blackwell_hub", "sage_varlen",
                      "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda",
                      "_sage_qk_int8_pv_fp16_triton", "xformers")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")


def _check_required(recipe: Recipe) -> list[Problem]:
    problems = []
    for key in _REQUIRED:
        section, name = key.split(".")
        if getattr(getattr(recipe, section), name) is None:
            problems.append(Problem(key, "must be set (null removes the model family's value); give a number"))
    return problems


def _check_limits(recipe: Recipe) -> list[Problem]:
    problems = []
    if recipe.seed > MAX_SEED:
        problems.append(Problem("seed", f"must be at most 2**64-1 = {MAX_SEED} (the generator's range), got "
                                        f"{recipe.seed}"))
    if not recipe.runtime.limits:
        return problems
    values = {key: getattr(getattr(recipe, key.split(".")[0]), key.split(".")[1]) for key in LIMITS}
    for name, stage in recipe.stages.items():
        values.update({f"stages.{name}.height": stage.height, f"stages.{name}.width": stage.width,
                       f"stages.{name}.num_frames": stage.num_frames,
                       f"stages.{name}.sampler.steps": stage.sampler.steps})
    for key, value in values.items():
        limit, what = LIMITS[key] if key in LIMITS else LIMITS[_generic(key)]
        if value is not None and value > limit:
            problems.append(Problem(key, f"{value} is above longvid's limit of {limit} {what}; set "
                                         f"runtime.limits=false to allow it"))
    return problems


def _generic(stage_key: str) -> str:
    """``stages.refine.sampler.steps`` -> ``sampler.steps``; ``stages.refine.height`` -> ``video.height``."""
    rest = stage_key.split(".", 2)[2]
    return rest if rest.startswith("sampler.") else f"video.{rest}"


def _check_output(recipe: Recipe) -> list[Problem]:
    from longvid.io.paths import BATCH_FIELDS, TEMPLATE_FIELDS, template_problems

    out = recipe.output
    problems = []
    if not out.dir.strip():
        problems.append(Problem("output.dir", "must name a folder (use . for the current one)"))
    if not out.name.strip():
        problems.append(Problem("output.name", "must not be empty; e.g. {recipe}-{prompt}-{seed}"))
    allowed = tuple(f for f in TEMPLATE_FIELDS if f not in BATCH_FIELDS)
    problems += [Problem("output.name", message) for message in template_problems(out.name, allowed)]
    clock = [f for f in ("date", "time") if "{" + f in out.name]
    if clock and recipe.runtime.checkpoint != "off":
        problems.append(Problem("output.name", f"{{{clock[0]}}} changes on every run, so a rerun would not find its "
                                               "checkpoint; remove it or set runtime.checkpoint=off"))
    if out.crop is not None:
        problems += _check_crop(recipe)
    if out.codec != "ffv1" and out.preset not in X264_PRESETS:
        problems.append(Problem("output.preset", f"unknown {out.codec} preset '{out.preset}'"
                                                 f"{registry.suggest(out.preset, X264_PRESETS)}; one of "
                                                 f"{', '.join(X264_PRESETS)}"))
    return problems


def _check_schedulers(recipe: Recipe, spec) -> list[Problem]:
    """``sampler.scheduler`` names a diffusers scheduler class and ``scheduler_config`` / ``flow_shift`` only
    change settings it has (diffusers would silently ignore an unknown one)."""
    from longvid.recipe.schedulers import drivable, scheduler_modules, scheduler_settings

    known = scheduler_modules()
    if not known or spec.loop != "steps":  # no diffusers here, or a family with its own schedule (family check)
        return []
    samplers = [("sampler", recipe.sampler, recipe.sampler)]
    samplers += [(f"stages.{n}.sampler", st.sampler, _stage_sampler(recipe, st)) for n, st in recipe.stages.items()]
    problems = []
    for prefix, own, effective in samplers:
        if own.scheduler is not None and own.scheduler not in known:
            problems.append(Problem(f"{prefix}.scheduler", f"'{own.scheduler}' is not a diffusers scheduler"
                                                           f"{registry.suggest(own.scheduler, known)}"))
            continue
        if own.scheduler is not None and drivable(own.scheduler) is False:
            problems.append(Problem(f"{prefix}.scheduler", f"{own.scheduler} is not a step-by-step sampling "
                                                           "scheduler (it has no step(model_output, timestep, "
                                                           "sample)); choose another"))
            continue
        settings = scheduler_settings(effective.scheduler or spec.scheduler)
        if settings is None:
            continue
        name = effective.scheduler or spec.scheduler
        for key in sorted(own.scheduler_config or {}):
            if key not in settings:
                problems.append(Problem(f"{prefix}.scheduler_config.{key}", f"{name} has no setting '{key}'"
                                                                            f"{registry.suggest(key, settings)}"))
        if own.flow_shift is not None and "flow_shift" not in settings:
            problems.append(Problem(f"{prefix}.flow_shift", f"{name} has no flow shift (a flow-matching setting)"))
    return problems


def _stage_sampler(recipe: Recipe, stage):
    from longvid.recipe.stages import stage_sampler

    return stage_sampler(recipe.sampler, stage)


def _check_model(recipe: Recipe) -> list[Problem]:
    from longvid.models.specs import TINY_VARIANTS

    path, family = recipe.model.path, recipe.model.family
    if not path.strip():
        return [Problem("model.path", "must not be empty; a hub id, a local folder or tiny:<family>")]
    if not path.startswith("tiny:"):
        return []
    variant = path.removeprefix("tiny:")
    if variant not in TINY_VARIANTS:
        return [Problem("model.path", f"no built-in tiny model '{variant}'{registry.suggest(variant, TINY_VARIANTS)}; "
                                      f"known: {', '.join('tiny:' + v for v in TINY_VARIANTS)}")]
    if TINY_VARIANTS[variant] != family:
        same = [f"tiny:{v}" for v, f in TINY_VARIANTS.items() if f == family]
        fix = f"set model.family={TINY_VARIANTS[variant]}" + (f" or model.path={same[0]}" if same else "")
        return [Problem("model.path", f"{path} is a {TINY_VARIANTS[variant]} model but model.family is {family}; {fix}")]
    return []


def _check_family(recipe: Recipe, spec) -> list[Problem]:
    """``model.variant`` and ``model.options`` against what the family declares, then the family's own rules."""
    problems = []
    model = recipe.model
    if model.variant is not None and model.variant not in spec.variants:
        known = f"one of {', '.join(spec.variants)}" if spec.variants else f"{spec.name} has no variants; remove it"
        problems.append(Problem("model.variant", f"'{model.variant}'{registry.suggest(model.variant, spec.variants)}"
                                                 f": {known}"))
    if model.options and spec.options is None:
        problems.append(Problem("model.options", f"{spec.name} takes no options; remove them"))
    elif spec.options is not None:
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec.options), dict(model.options)))
        except OmegaConfBaseException as err:  # first: a wrong type is a ValidationError, itself a ValueError
            key = getattr(err, "full_key", "") or ""
            reason = str(err).splitlines()[0]
            problems.append(Problem(f"model.options.{key}".rstrip("."), reason))
        except ValueError as err:  # the options' own range checks: "model.options.<key> <what to do>"
            key, _, reason = str(err).partition(" ")
            problems.append(Problem(key, reason) if key.startswith("model.options.") and reason else
                            Problem("model.options", str(err)))
    if recipe.image is not None:
        problems += _check_image(recipe.image, spec)
    if spec.check is not None and not problems:
        problems += [Problem(key, message) for key, message in spec.check(recipe)]
    return problems


def _check_image(path: str, spec) -> list[Problem]:
    """The i2v image: a family that takes one, a readable file that decodes as an image (hostile input: the
    decoder's size guard stays on)."""
    if not spec.image_to_video:
        return [Problem("image", f"{spec.name} does not generate from an image; remove it")]
    file = Path(path).expanduser()
    if not file.is_file():
        return [Problem("image", f"no image file '{path}'")]
    try:
        from PIL import Image

        with Image.open(file) as im:
            im.verify()  # decodes the structure without keeping pixels; raises on a broken or foreign file
            width, height = im.size
    except Exception as err:  # noqa: BLE001 - PIL raises many types (UnidentifiedImageError, DecompressionBomb…)
        return [Problem("image", f"'{path}' is not a readable image ({type(err).__name__})")]
    if min(width, height) < 8:
        return [Problem("image", f"'{path}' is {width}x{height}; an image of at least 8x8 pixels is needed")]
    return []


def _check_video(recipe: Recipe, spec) -> list[Problem]:
    problems = []
    video = recipe.video
    frames = video.num_frames
    if frames is not None and frames < 1:
        problems.append(Problem("video.num_frames", f"must be at least 1, got {frames}"))
    elif frames is not None and not spec.frames_valid(frames):
        below, above = spec.nearest_frames(frames)
        problems.append(Problem("video.num_frames", f"{spec.name} needs {spec.temporal_stride}k+1 frames, "
                                                     f"got {frames} (nearest: {below} or {above})"))
    for axis in ("height", "width"):
        size = getattr(video, axis)
        m = spec.spatial_multiple
        if size is not None and (size < m or size % m):
            lower, upper = max(m, size // m * m), (size // m + 1) * m
            crop = ""
            other = video.width if axis == "height" else video.height
            if other and not other % m and not size % 2:  # a crop of the larger size gives this one (even: 4:2:0)
                sizes = [size, other] if axis == "height" else [other, size]
                crop = f"; generate {upper} and set output.crop=[{sizes[0]},{sizes[1]}] for the exact size"
            problems.append(Problem(f"video.{axis}", f"{spec.name} needs a multiple of {m}, got {size} "
                                                     f"(nearest: {lower} or {upper}{crop})"))
    if video.fps is not None and video.fps <= 0:
        problems.append(Problem("video.fps", f"must be positive, got {video.fps}"))
    if spec.max_frames and frames and frames > spec.max_frames:
        long_methods = [n for n in recipe.methods if registry.method_class(n).long_video]
        if not long_methods:
            known = [n for n in registry.METHODS if spec.name in registry.method_class(n).families]
            fix = f"add a long-video method ({', '.join(f'methods.{n}' for n in known)}; see `longvid methods`)" \
                if known else f"add a long-video method (see `longvid methods`) or use at most {spec.max_frames} frames"
            problems.append(Problem("video.num_frames", f"{frames} frames exceed {spec.name}'s motion-module "
                                                         f"limit of {spec.max_frames}; {fix}"))
    return problems


def _check_sampler(s, prefix: str) -> list[Problem]:
    """Ranges of a sampler (the recipe's, or a stage's changes to it: unset keys are skipped)."""
    problems = []
    if s.steps is not None and s.steps < 1:
        problems.append(Problem(f"{prefix}.steps", f"must be at least 1, got {s.steps}"))
    for key in ("guidance_scale", "guidance_scale_2", "flow_shift"):
        value = getattr(s, key)
        if value is not None and value < 0:
            problems.append(Problem(f"{prefix}.{key}", f"must be >= 0, got {value}"))
    if s.eta is not None and not 0 <= s.eta <= 1:
        problems.append(Problem(f"{prefix}.eta", f"must be in [0, 1], got {s.eta}"))
    return problems


def _check_ranges(recipe: Recipe) -> list[Problem]:
    s = recipe.sampler
    problems = _check_sampler(s, "sampler")
    if s.max_sequence_length is not None and s.max_sequence_length < 1:
        problems.append(Problem("sampler.max_sequence_length", f"must be positive, got {s.max_sequence_length}"))
    backend = recipe.runtime.attention_backend
    if backend is not None:
        if backend not in ATTENTION_BACKENDS:
            hint = registry.suggest(backend, ATTENTION_BACKENDS)
            public = ", ".join(b for b in ATTENTION_BACKENDS if not b.startswith("_"))
            problems.append(Problem("runtime.attention_backend", f"unknown backend '{backend}'{hint}; known: {public}"))
        elif recipe.model.family != "wan":
            problems.append(Problem("runtime.attention_backend", f"{recipe.model.family} attention does not go "
                                                                 "through diffusers' dispatch; remove it (Wan only)"))
    if recipe.runtime.compile != "none" and recipe.model.family != "wan":
        problems.append(Problem("runtime.compile", f"{recipe.model.family} declares no repeated blocks to compile; "
                                                   "remove it (Wan only)"))
    if recipe.runtime.checkpoint_every < 1:
        problems.append(Problem("runtime.checkpoint_every", f"must be at least 1, got {recipe.runtime.checkpoint_every}"))
    if not 0 <= recipe.output.crf <= 51:
        problems.append(Problem("output.crf", f"must be in [0, 51] (lower = better), got {recipe.output.crf}"))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", recipe.runtime.device):
        problems.append(Problem("runtime.device", f"expected auto, cpu, cuda or cuda:N, got '{recipe.runtime.device}'"
                                                  + (" (Apple GPUs are not supported)" if "mps" in
                                                     recipe.runtime.device else "")))
    if recipe.runtime.threads is not None and recipe.runtime.threads < 1:
        problems.append(Problem("runtime.threads", f"must be at least 1, got {recipe.runtime.threads}"))
    if not 1 <= recipe.output.threads <= 64:
        problems.append(Problem("output.threads", f"must be in [1, 64], got {recipe.output.threads}"))
    if recipe.runtime.decode_chunk < 1:
        problems.append(Problem("runtime.decode_chunk", f"must be at least 1, got {recipe.runtime.decode_chunk}"))
    if recipe.seed < 0:
        problems.append(Problem("seed", f"must be >= 0, got {recipe.seed}"))
    return problems


def _check_prompt(recipe: Recipe) -> list[Problem]:
    prompt = recipe.prompt
    if prompt is None or isinstance(prompt, str):
        return []
    if not isinstance(prompt, dict) or not prompt:
        return [Problem("prompt", "expected a string or a mapping {frame: prompt}")]
    problems = []
    try:
        frames = sorted(int(k) for k in prompt)
    except (TypeError, ValueError):
        return [Problem("prompt", f"multi-prompt keys must be frame numbers, got {sorted(map(str, prompt))}")]
    if frames[0] != 0:
        problems.append(Problem("prompt", f"multi-prompt needs a prompt at frame 0 (first key is {frames[0]})"))
    if recipe.stages and any(st.num_frames not in (None, recipe.video.num_frames) for st in recipe.stages.values()):
        problems.append(Problem("prompt", "keyframes are frames of the output; a stage with another frame count "
                                          "cannot take a {frame: prompt} mapping (use one prompt there)"))
    n = recipe.video.num_frames
    if n is not None and frames[-1] >= n:
        problems.append(Problem("prompt", f"prompt key {frames[-1]} is beyond the last frame ({n - 1})"))
    if any(not isinstance(v, str) for v in prompt.values()):
        problems.append(Problem("prompt", "every multi-prompt value must be a string"))
    family_prompts = recipe.model.family in registry.MODELS and registry.model_spec(recipe.model.family).loop == "units"
    if not family_prompts and not any(registry.method_class(m).multi_prompt for m in recipe.methods):
        known = [m for m in registry.METHODS if registry.method_class(m).multi_prompt]
        problems.append(Problem("prompt", "a {frame: prompt} mapping needs a multi-prompt method"
                                          + (f" (methods.{known[0]})" if known else "")))
    return problems


def _check_stages(recipe: Recipe, spec) -> list[Problem]:
    """An impossible coarse-to-fine plan is refused before loading: sizes, order, strength, hand-offs."""
    from longvid.recipe.stages import plan_stages

    if not recipe.stages:
        return []
    problems = []
    video = recipe.video
    for name, stage in recipe.stages.items():
        key = f"stages.{name}"
        problems += _check_sampler(stage.sampler, f"{key}.sampler")
        if not 0 < stage.strength <= 1:
            problems.append(Problem(f"{key}.strength", f"must be in (0, 1] (1 = from pure noise), got {stage.strength}"))
        for axis in ("height", "width"):
            size, m = getattr(stage, axis), spec.spatial_multiple
            if size is not None and (size < m or size % m):
                lower, upper = max(m, size // m * m), (size // m + 1) * m
                problems.append(Problem(f"{key}.{axis}", f"{spec.name} needs a multiple of {m}, got {size} "
                                                         f"(nearest: {lower} or {upper})"))
        if stage.num_frames is not None and not spec.frames_valid(stage.num_frames):
            below, above = spec.nearest_frames(max(stage.num_frames, 1))
            problems.append(Problem(f"{key}.num_frames", f"{spec.name} needs {spec.temporal_stride}k+1 frames, got "
                                                         f"{stage.num_frames} (nearest: {below} or {above})"))
    if problems or None in (video.height, video.width, video.num_frames):
        return problems
    plans = plan_stages(recipe)
    first, last = plans[0], plans[-1]
    if first.strength != 1:
        problems.append(Problem(f"stages.{first.name}.strength", "the first stage starts from noise: strength must be 1 "
                                                                  f"(got {first.strength})"))
    for axis in ("height", "width", "num_frames"):
        if getattr(last, axis) != getattr(video, axis):
            problems.append(Problem(f"stages.{last.name}.{axis}", f"the last stage makes the output, so it is "
                                                                  f"video.{axis} ({getattr(video, axis)}); set video.{axis} "
                                                                  f"instead (got {getattr(last, axis)})"))
    for prev, plan in zip(plans, plans[1:]):
        key = f"stages.{plan.name}"
        for axis in ("height", "width", "num_frames"):
            if getattr(plan, axis) < getattr(prev, axis):
                problems.append(Problem(f"{key}.{axis}", f"{getattr(plan, axis)} is smaller than the previous stage "
                                                         f"'{prev.name}' ({getattr(prev, axis)}); stages only enlarge"))
        if plan.num_frames != prev.num_frames and plan.upsample == "pixel":
            problems.append(Problem(f"{key}.num_frames", "a pixel hand-off keeps the frame count; use upsample: "
                                                         "latent to change it"))
        elif plan.num_frames != prev.num_frames and plan.interpolation == "bicubic":
            problems.append(Problem(f"{key}.interpolation", "bicubic resizes frames in 2-D; a latent frame-count "
                                                            "change needs bilinear (trilinear) or nearest"))
        if plan.steps_run < 1:
            problems.append(Problem(f"{key}.strength", f"{plan.strength} of {plan.sampler.steps} steps runs no step; "
                                                       f"raise strength or sampler.steps"))
    return problems


def _check_methods(recipe: Recipe, spec) -> list[Problem]:
    from longvid.recipe.stages import MAIN_STAGE, methods_in

    problems = []
    names = list(recipe.methods)
    stages = list(recipe.stages) or [MAIN_STAGE]
    for name in names:
        cls = registry.method_class(name)
        if spec.name not in cls.families:
            problems.append(Problem(f"methods.{name}", f"does not support {spec.name} "
                                                       f"(supports: {', '.join(sorted(cls.families))})"))
            continue
        scope = getattr(recipe.methods[name], "stages", None)
        unknown = [s for s in scope or [] if s not in recipe.stages]
        if unknown:
            known = ", ".join(recipe.stages) if recipe.stages else "none (this recipe has no stages:)"
            problems.append(Problem(f"methods.{name}.stages", f"no stage {', '.join(map(repr, unknown))}; "
                                                              f"stages: {known}"))
        for other in names[names.index(name) + 1:]:
            if spec.name not in registry.method_class(other).families:
                continue
            if other in cls.conflicts or name in registry.method_class(other).conflicts:
                problems.append(Problem(f"methods.{name}", f"conflicts with methods.{other}; remove one"))
                continue
            shared = [s for s in stages if name in methods_in(recipe, s) and other in methods_in(recipe, s)]
            kinds = cls.patched_sites(recipe.methods[name], spec) & \
                registry.method_class(other).patched_sites(recipe.methods[other], spec)
            if shared and kinds:
                where = f" in stage {shared[0]}" if recipe.stages else ""
                what = "RoPE" if kinds == {"rope"} else f"{'/'.join(sorted(kinds))} attention sites"
                problems.append(Problem(f"methods.{name}", f"patches the same {what} as methods.{other}{where} (one "
                                                           f"method per site); remove one or scope them to different "
                                                           f"stages (methods.{name}.stages)"))
        problems += [Problem(k, m) for k, m in cls.check(recipe.methods[name], recipe, spec)]
    return problems
