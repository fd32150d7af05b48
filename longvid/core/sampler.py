"""longvid's own denoising loop: one short function for every model and method, resumable at any step.

A stage's loop gets a :class:`StageJob`: the denoiser ``denoise(x, t, cond)`` (guidance included, methods
may wrap it), any diffusers scheduler, the stage's full schedule and the step it starts at (``strength``).
After every step it reports its progress and a way to capture its state to ``job.on_step``; given
``job.resume`` it continues from such a state bit-identically (latents, and the scheduler's multistep
history). Owning the loop (instead of calling a diffusers pipeline) is what lets noise rescheduling, window
fusion, stage transitions and checkpoints plug in. The order of operations mirrors diffusers==0.42.1
``WanPipeline`` / ``AnimateDiffPipeline``, so the vanilla result is numerically the pipeline's.

A model family with its own schedule (autoregressive, pyramidal) replaces :func:`run_stage` through
``ModelAdapter.sample_stage`` and keeps the same contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from longvid.core.context import GenerationContext


@dataclass
class LoopState:
    """What a loop needs to continue after ``step`` steps: tensors (saved as safetensors) and plain data (JSON)."""

    step: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


#: ``on_step(steps_done, capture)``; ``capture()`` returns the :class:`LoopState` (only built when needed).
StepReport = Callable[[int, Callable[[], LoopState]], None]


@dataclass
class StageJob:
    """Everything one stage's loop needs. ``timesteps`` is the stage's full schedule; the loop runs
    ``timesteps[start:]`` (or from ``resume.step``)."""

    denoise: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    cond: Any
    latents: torch.Tensor
    scheduler: Any
    timesteps: torch.Tensor
    start: int
    ctx: GenerationContext
    generator: torch.Generator
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    on_step: StepReport | None = None
    resume: LoopState | None = None
    plan: Any = None  # the StagePlan (sizes, sampler, methods), for loops that need more than the schedule
    recipe: Any = None  # the run's Recipe (family options such as Pyramid Flow's per-stage steps)


def set_timesteps(scheduler, steps: int, device: torch.device, start: int = 0) -> torch.Tensor:
    """Configure ``scheduler`` for ``steps`` steps starting at step ``start``; return the full schedule."""
    scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        # as the pipelines do: no timestep lookup (and no device sync) per step; v2v starts at `start`
        scheduler.set_begin_index(start * getattr(scheduler, "order", 1))
    return scheduler.timesteps


@torch.no_grad()
def run_stage(job: StageJob) -> torch.Tensor:
    """The default loop: ``x <- scheduler.step(denoise(x, t), t, x)`` over the stage's remaining steps."""
    x, scheduler, ctx = job.latents, job.scheduler, job.ctx
    first = job.start
    if job.resume is not None:
        x = job.resume.tensors["latents"].to(x.device)
        load_scheduler_state(scheduler, job.resume.tensors, job.resume.data["scheduler"])
        first = job.resume.step
    for i in range(first, len(job.timesteps)):
        t = job.timesteps[i]
        ctx.step, ctx.timestep = i, float(t)
        # identity for flow-matching schedulers (FlowMatchEuler has no such method at all)
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        prediction = job.denoise(model_in, t, job.cond)
        x = scheduler.step(prediction, t, x, **job.step_kwargs, return_dict=False)[0]
        if job.on_step is not None:
            job.on_step(i + 1, lambda: _default_state(i + 1, x, scheduler))
    return x


def _default_state(step: int, x: torch.Tensor, scheduler) -> LoopState:
    tensors, data = scheduler_state(scheduler)
    return LoopState(step, {"latents": x, **tensors}, {"scheduler": data})


# ------------------------------------------------------------------------------------- scheduler state


def scheduler_state(scheduler) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every attribute of a diffusers scheduler (multistep history included) as tensors + JSON-able data.

    Generic over schedulers: tensors and arrays go to ``tensors`` under ``scheduler.<name>[.<i>]``, numbers,
    strings and None to ``data``; lists/tuples recurse. Anything else raises ``TypeError`` naming the
    attribute (checked when a run starts, so a scheduler that cannot be checkpointed fails before any work).
    """
    tensors: dict[str, torch.Tensor] = {}
    data = {name: _encode(value, f"scheduler.{name}", tensors) for name, value in vars(scheduler).items()
            if name != "_internal_dict"}  # the config: the fresh scheduler has it already
    return tensors, data


def load_scheduler_state(scheduler, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    """Restore :func:`scheduler_state` onto a scheduler built from the same config. Only attributes the
    scheduler has (after a step) are set: a checkpoint names data, never new attributes or methods."""
    allowed = set(vars(scheduler)) | {"model_outputs", "timestep_list", "last_sample", "this_order",
                                      "lower_order_nums", "_step_index", "_begin_index", "sample"}
    for name, value in data.items():
        if name not in allowed or callable(getattr(type(scheduler), name, None)):
            from longvid.errors import CheckpointError

            raise CheckpointError(f"the checkpoint names an unknown scheduler attribute {name!r}; pass --restart to "
                                  "discard it")
        setattr(scheduler, name, _decode(value, tensors))


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key, "device": str(value.device)}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"ndarray": key}
    if isinstance(value, np.generic):
        return {"scalar": value.item(), "dtype": str(value.dtype)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return {"list" if isinstance(value, list) else "tuple": items}
    raise TypeError(f"cannot checkpoint scheduler attribute {key.removeprefix('scheduler.')} of type "
                    f"{type(value).__name__}")


def _decode(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]].to(node["device"])
    if "ndarray" in node:
        return tensors[node["ndarray"]].numpy().copy()
    if "scalar" in node:
        return np.dtype(node["dtype"]).type(node["scalar"])
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    return node["value"]
