"""Multi-prompt keyframes: per-frame interpolation (parity with diffusers) and per-window assignment."""

import pytest
import torch
from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

from longvid.core.prompts import assign_windows, interpolate_keyframes
from longvid.core.windows import context_views


class _DiffusersMultiPrompt(AnimateDiffFreeNoiseMixin):
    """diffusers' FreeNoise prompt path with a lookup table instead of a text encoder."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table
        self._free_noise_prompt_interpolation_callback = self._lerp

    def encode_prompt(self, prompt, **kwargs):
        return torch.stack([self.table[p] for p in prompt]), None  # (P, S, D)


def test_interpolate_equals_diffusers_lerp():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(7, 32, generator=g) for _ in range(3))  # (S, D) each
    expected, _ = _DiffusersMultiPrompt({"a": a, "b": b, "c": c})._encode_prompt_free_noise(
        {0: "a", 10: "b", 30: "c"}, 48, torch.device("cpu"), 1, False
    )
    ours = interpolate_keyframes({0: a, 10: b, 30: c}, 48)
    assert ours.shape == (48, 7, 32)
    assert torch.equal(ours, expected)
    # values, by hand: the keyframes, the midpoint of the first segment, and the held tail
    assert torch.equal(ours[10], b) and torch.equal(ours[0], a)
    assert torch.allclose(ours[5], (a + b) / 2, atol=1e-6)
    assert torch.allclose(ours[20], (b + c) / 2, atol=1e-6)
    assert torch.allclose(ours[47], c, atol=1e-6)


def test_interpolate_keys_in_any_order_and_single_frame():
    a, b = torch.zeros(3), torch.ones(3)
    assert interpolate_keyframes({4: b, 0: a}, 5)[:, 0].tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert torch.equal(interpolate_keyframes({0: b}, 1), b[None])  # diffusers returns zeros here


@pytest.mark.parametrize(
    "keyframes,num_frames,match",
    [
        ({}, 8, "empty"),
        ({2: torch.zeros(2)}, 8, "frame 0"),
        ({0: torch.zeros(2), 8: torch.zeros(2)}, 8, "outside the clip"),
        ({0: torch.zeros(2), "4": torch.zeros(2)}, 8, "integer"),
        ({0: torch.zeros(2), 4: torch.zeros(3)}, 8, "one shape"),
    ],
)
def test_interpolate_errors(keyframes, num_frames, match):
    with pytest.raises(ValueError, match=match):
        interpolate_keyframes(keyframes, num_frames)


def test_assign_windows_majority_span():
    views = context_views(48, 16, 4)  # (0,16), (4,20), …, (32,48)
    keys = assign_windows({0: "a", 10: "b", 30: "c"}, views)
    # (0,16): a 10 / b 6 → 0; (4,20): a 6 / b 10 → 10; (20,36): b 10 / c 6 → 10; (24,40): b 6 / c 10 → 30
    assert keys == [0, 10, 10, 10, 10, 10, 30, 30, 30]
    assert assign_windows({0: "a", 8: "b"}, [(0, 16)]) == [0]  # tie → earlier keyframe
    assert assign_windows({0: "a"}, [(0, 16), (40, 56)]) == [0, 0]
    with pytest.raises(ValueError, match="frame 0"):
        assign_windows({3: "a"}, [(0, 16)])
