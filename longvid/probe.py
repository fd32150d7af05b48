"""``longvid probe``: assign FreeLOC's treatment (VRPR or TSA) to every self-attention layer of a model.

FreeLOC's authors released only the result of their probing (a layer list for Wan 2.1 1.3B), not the probe. This
is longvid's own, documented procedure (docs/methods/freeloc.md), which loads the model once:

1. at the recipe's length, draw latents and take a few prompts and timesteps of the recipe's schedule;
2. run the unpatched model once per (prompt, timestep); at every self-attention layer, on that layer's own input,
   also run the layer with VRPR alone and with TSA alone, and measure the relative change of its output,
   ``‖A_treated − A‖_F / ‖A‖_F`` (the same input for all three, so each layer is judged on its own);
3. average over prompts and timesteps, and give each layer the treatment that changes it less (TSA on ties);
4. write a preset JSON keyed by the model's fingerprint (per denoiser: layers, attention width) and length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from longvid.core.hooks import ForwardHook, add_hook
from longvid.core.noise import gaussian_noise
from longvid.core.sampler import set_timesteps
from longvid.methods.freeloc import PRESET_FORMAT, FreeLocConfig, FreeLocOp, fingerprint
from longvid.models.wan import WanOpProcessor
from longvid.recipe.schema import Recipe

DEFAULT_PROMPTS = ("a red fox running through fresh snow", "waves rolling onto a rocky beach at sunset",
                   "a busy city street at night with neon signs")
DEFAULT_FRACTIONS = (0.2, 0.5, 0.8)


@torch.no_grad()
def probe(adapter, recipe: Recipe, prompts=DEFAULT_PROMPTS, fractions=DEFAULT_FRACTIONS,
          progress: Callable[[int, int], None] | None = None) -> dict:
    """The preset (a JSON-able dict) for ``adapter``'s model at ``recipe``'s length; see the module docstring."""
    config = recipe.methods.get("freeloc") or FreeLocConfig()
    ops = {"vrpr": FreeLocOp("vrpr", config), "tsa": FreeLocOp("tsa", config)}
    sites = adapter.attention_sites("full")
    scores = {(s.denoiser, s.layer): {"vrpr": [], "tsa": []} for s in sites}
    video = recipe.video
    shape = adapter.latent_shape(video.num_frames, video.height, video.width)
    generator = torch.Generator("cpu").manual_seed(recipe.seed)
    scheduler = adapter.make_scheduler(recipe.sampler)
    timesteps = set_timesteps(scheduler, recipe.sampler.steps, adapter.device)
    undo = []
    for site in sites:
        processors = {kind: WanOpProcessor(site, op, adapter.rope_modules[site.denoiser]) for kind, op in ops.items()}

        def measure(module, forward, *args, site=site, processors=processors, **kwargs):
            out = forward(*args, **kwargs)
            hidden, rotary = args[0], args[3] if len(args) > 3 else kwargs.get("rotary_emb")
            base = out.float().norm()
            for kind, processor in processors.items():
                treated = processor(module, hidden, None, None, rotary)
                scores[(site.denoiser, site.layer)][kind].append(
                    ((treated.float() - out.float()).norm() / base.clamp_min(1e-12)).item())
            return out

        undo.append(add_hook(site.module, "longvid.probe", ForwardHook(measure)))
    runs = [(p, f) for p in prompts for f in fractions]
    try:
        for i, (prompt, fraction) in enumerate(runs):
            cond = adapter.encode(prompt, recipe.negative_prompt, recipe.sampler)
            t = timesteps[min(int(fraction * len(timesteps)), len(timesteps) - 1)]
            x = gaussian_noise(shape, generator, dtype=adapter.latent_dtype, device=adapter.device)
            adapter.predict(x, t, cond.positive, adapter.expert(t))  # every expert's layers at their own t
            if adapter.expert(t) == 0 and len(adapter.denoisers) > 1:  # let the other expert see its range too
                low = timesteps[-1 - min(int(fraction * len(timesteps)), len(timesteps) - 1)]
                adapter.predict(x, low, cond.positive, adapter.expert(low))
            if progress is not None:
                progress(i + 1, len(runs))
    finally:
        while undo:
            undo.pop()()
    tsa, table = {}, {}
    for (den, layer), s in sorted(scores.items()):
        if not s["vrpr"]:
            continue
        vrpr, tsa_score = sum(s["vrpr"]) / len(s["vrpr"]), sum(s["tsa"]) / len(s["tsa"])
        table.setdefault(den, []).append({"layer": layer, "vrpr": round(vrpr, 6), "tsa": round(tsa_score, 6)})
        if tsa_score <= vrpr:
            tsa.setdefault(den, []).append(layer)
    return {"format": PRESET_FORMAT, "model": recipe.model.path, "latent_frames": shape[2],
            "fingerprint": fingerprint(adapter), "tsa": {den: tsa.get(den, []) for den in table},
            "prompts": list(prompts), "timestep_fractions": list(fractions), "relative_change": table}


def write_preset(preset: dict, path: str | Path) -> Path:
    """Write ``preset`` as JSON (atomically: a temporary name, then a rename)."""
    from longvid.io.paths import create_exclusive, partial_path, remove_quietly

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        import os

        with os.fdopen(create_exclusive(tmp), "w", encoding="utf-8") as f:
            f.write(json.dumps(preset, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)
    return path
