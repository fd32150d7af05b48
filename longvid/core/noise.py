"""Initial-noise builders.

Every builder has the same signature, so the runner can pick one by name from a recipe::

    builder(shape, generator, *, dtype=torch.float32, device="cpu", frame_dim=2, **knobs) -> Tensor

``shape`` is the full latent shape (``(B, C, F, H, W)`` for AnimateDiff and Wan, hence ``frame_dim=2``).
All randomness comes from ``generator`` (a ``torch.Generator``, a list of them, one per batch item, or
None for the global RNG), so a generation is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from diffusers.utils.torch_utils import randn_tensor

from longvid.core.windows import check_window

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


class NoiseBuilder(Protocol):
    """The signature every builder in :data:`NOISE_BUILDERS` follows (see the module docstring)."""

    def __call__(
        self,
        shape: Sequence[int],
        generator: GeneratorArg,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        frame_dim: int = 2,
        **knobs,
    ) -> torch.Tensor: ...


def gaussian_noise(
    shape: Sequence[int],
    generator: GeneratorArg,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    frame_dim: int = 2,
) -> torch.Tensor:
    """Plain i.i.d. Gaussian noise, drawn exactly as diffusers pipelines draw their latents.

    Uses ``diffusers.utils.torch_utils.randn_tensor`` (CPU generator → drawn on CPU then moved; a list of
    generators → one draw per batch item), so a vanilla longvid generation matches the diffusers pipeline
    bit-for-bit for the same seed. ``frame_dim`` is accepted for the common signature and unused.
    """
    return randn_tensor(tuple(shape), generator=_as_generator_arg(generator), device=torch.device(device), dtype=dtype)


def freenoise_noise(
    shape: Sequence[int],
    generator: GeneratorArg,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    frame_dim: int = 2,
    window: int = 16,
    stride: int = 4,
) -> torch.Tensor:
    """FreeNoise noise rescheduling: frames past the first window reuse its noise, shuffled per stride block.

    Why: FreeNoise keeps long videos coherent by giving every context window the *same* set of noise frames
    (a local permutation of the first window), instead of fresh, unrelated noise.

    Semantics (official FreeNoise, notes §2.1; diffusers ``noise_type="shuffle_context"``):
    for ``f = window, window+stride, …`` the ``stride`` frames ``[f, f+stride)`` are set, in place, to the
    frames ``[f-window, f-window+stride)`` in a random order, so the copies chain and every frame ``t ≥ window``
    is a copy of a first-window frame of the same stride block (mod ``window``).

    Draw order (for bit-exact parity with diffusers 0.42.1 ``_prepare_latents_free_noise``): the full tensor is
    drawn first with ``randn_tensor``; then one ``torch.randperm(stride, generator=generator)`` per block, in
    block order. Unlike the official code, any frame count works: a ragged last block copies a prefix of its
    permuted source block (as diffusers does). ``F ≤ window`` returns plain noise (no permutation is drawn).

    Deviations, where diffusers fails: with a list of generators the shuffle uses ``generator[0]`` (one
    shuffle shared by the batch, as in the official code); a CUDA generator draws its permutations on its own
    device instead of raising.
    """
    check_window(window, stride)
    noise = gaussian_noise(shape, generator, dtype=dtype, device=device)  # (…, F, …)
    dim = frame_dim % noise.ndim
    num_frames = noise.shape[dim]
    perm_gen = _first_generator(generator)
    for start in range(window, num_frames, stride):
        src = _shuffled_block(start - window, stride, perm_gen)  # (stride,) frame indices, on the generator's device
        count = min(stride, num_frames - start)  # ragged tail → prefix of the permuted block
        src = src[:count].to(noise.device)
        noise.narrow(dim, start, count).copy_(noise.index_select(dim, src))
    return noise


NOISE_BUILDERS: dict[str, NoiseBuilder] = {"gaussian": gaussian_noise, "freenoise": freenoise_noise}


def _shuffled_block(first: int, length: int, generator: torch.Generator | None) -> torch.Tensor:
    """``first + randperm(length)``: the source frames of one FreeNoise block, in shuffled order."""
    rand_device = generator.device if generator is not None else torch.device("cpu")
    return first + torch.randperm(length, generator=generator, device=rand_device)  # (length,)


def _first_generator(generator: GeneratorArg) -> torch.Generator | None:
    """The generator the permutations are drawn from (the first one of a list)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if len(generator) == 0:
        raise ValueError("generator: an empty list of generators was given; pass one generator or one per batch item")
    return generator[0]


def _as_generator_arg(generator: GeneratorArg) -> torch.Generator | list[torch.Generator] | None:
    """randn_tensor takes a generator or a *list* of them; accept any sequence."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return list(generator)
