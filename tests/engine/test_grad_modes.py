"""Library code runs the same under plain mode, ``torch.no_grad()`` and ``torch.inference_mode()`` — also
when the model itself was loaded under inference mode (its weights are then inference tensors)."""

import contextlib

import pytest
import torch

import longvid
from tests.helpers import animatediff_recipe, wan_recipe

MODES = {"plain": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
METHODS = {
    "freelong-animatediff": (animatediff_recipe, 20, {"freelong": {"window": 8}, "freenoise": {"fusion": "none"}}),
    "freenoise-layer": (animatediff_recipe, 20, {"freenoise": {"fusion": "layer", "window": 8}}),
    "freenoise-block": (animatediff_recipe, 20, {"freenoise": {"fusion": "block", "window": 8}}),
    "freelong-wan": (wan_recipe, 17, {"freelong": {"window": 9}}),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_in_every_grad_mode_with_the_same_result(method):
    make, frames, methods = METHODS[method]
    family = "animatediff" if make is animatediff_recipe else "wan"
    mapping = dict(make(f"tiny:{family}", num_frames=frames), methods=methods)
    mapping["sampler"]["steps"] = 2
    results = {}
    for name, mode in MODES.items():
        with mode():  # loading too happens inside: weights are inference tensors under inference_mode
            results[name] = longvid.generate(mapping, write=False).latents.clone()
    assert torch.equal(results["plain"], results["no_grad"])
    assert torch.equal(results["plain"], results["inference_mode"])
    assert torch.isfinite(results["plain"]).all()
