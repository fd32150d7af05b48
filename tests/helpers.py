"""Small recipe mappings and utilities shared by the tests."""

import torch


def wan_recipe(path, **video):
    """A small Wan recipe mapping (CPU, float32) for tests."""
    return {"model": {"family": "wan", "path": str(path)},
            "video": {"num_frames": 9, "height": 32, "width": 48, "fps": 8, **video},
            "prompt": "a red fox running", "negative_prompt": "blurry",
            "sampler": {"steps": 3, "guidance_scale": 5.0, "max_sequence_length": 16},
            "seed": 3, "runtime": {"device": "cpu"}}


def animatediff_recipe(path, **video):
    return {"model": {"family": "animatediff", "path": str(path)},
            "video": {"num_frames": 8, "height": 32, "width": 32, "fps": 8, **video},
            "prompt": "a red fox running", "negative_prompt": "blurry",
            "sampler": {"steps": 3, "guidance_scale": 7.5}, "seed": 3, "runtime": {"device": "cpu"}}


def frames01(chunks) -> torch.Tensor:
    """Concatenate decode_stream chunks (B, 3, f, H, W) in [-1, 1] into (B, F, 3, H, W) in [0, 1], as the
    diffusers pipelines return with output_type="pt"."""
    video = torch.cat(list(chunks), dim=2)
    return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
