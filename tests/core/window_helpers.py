"""Shared pieces of the window tests: sizes, the pyramid, seeded weights and inputs."""

import torch

C, HEADS = 32, 2
PYRAMID_16 = [1, 2, 3, 4, 5, 6, 7, 8, 8, 7, 6, 5, 4, 3, 2, 1]


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights everywhere (LayerNorms and zero-initialised biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def _x(n: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, frames, C, generator=torch.Generator().manual_seed(seed))  # (N, F, C)


