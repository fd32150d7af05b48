"""Initial-noise builders: exact draws, FreeNoise structure, and parity with diffusers' FreeNoise latents."""

import pytest
import torch
from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin
from diffusers.utils.torch_utils import randn_tensor

from longvid.core.noise import NOISE_BUILDERS, freenoise_noise, gaussian_noise


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _first_window_sources(noise: torch.Tensor, window: int) -> list[int]:
    """For each frame of a (B, C, F, H, W) tensor, the first-window frame it is an exact copy of."""
    flat = noise.transpose(0, 2).reshape(noise.shape[2], -1)  # (F, B·C·H·W)
    sources = []
    for frame in flat:
        hits = [j for j in range(window) if torch.equal(frame, flat[j])]
        assert len(hits) == 1, "every frame must be an exact copy of exactly one first-window frame"
        sources.append(hits[0])
    return sources


def test_gaussian_is_randn_tensor():
    shape = (2, 4, 9, 5, 6)
    expected = randn_tensor(shape, generator=_gen(3), device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(gaussian_noise(shape, _gen(3)), expected)
    gens = [_gen(1), _gen(2)]
    expected = randn_tensor(shape, generator=[_gen(1), _gen(2)], device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(gaussian_noise(shape, gens), expected)


@pytest.mark.parametrize("num_frames", [16, 17, 26, 64, 66, 130])
def test_freenoise_frames_copy_their_stride_block(num_frames):
    """Window 16, stride 4: frame t ≥ 16 copies a first-window frame of block ⌊(t mod 16)/4⌋."""
    noise = freenoise_noise((1, 2, num_frames, 3, 4), _gen(0), window=16, stride=4)
    sources = _first_window_sources(noise, 16)
    assert sources[:16] == list(range(16))
    for t in range(16, num_frames):
        assert sources[t] // 4 == (t % 16) // 4, f"frame {t} copies frame {sources[t]} (wrong block)"
    for start in range(16, num_frames - 3, 4):  # full blocks are permutations, never repeats
        assert sorted(sources[start : start + 4]) == list(range((start % 16), (start % 16) + 4))
    plain = gaussian_noise((1, 2, num_frames, 3, 4), _gen(0))
    assert torch.equal(noise[:, :, :16], plain[:, :, :16])


def test_freenoise_is_not_trivially_periodic():
    """The shuffle actually permutes: some block differs from a plain repeat of the first window."""
    sources = _first_window_sources(freenoise_noise((1, 1, 64, 2, 2), _gen(0)), 16)
    assert sources[16:] != [t % 16 for t in range(16, 64)]


def test_wan_latent_at_native_length_is_plain_noise():
    shape = (1, 16, 21, 6, 8)  # Wan 81 px frames → 21 latent frames
    assert torch.equal(freenoise_noise(shape, _gen(5), window=21, stride=5), gaussian_noise(shape, _gen(5)))


def test_wan_latent_long_blocks_chain():
    """F=81 latent frames, window 21, stride 5 (stride does not divide the window).

    The algorithm's definition: frames [f, f+5) are a permutation (a prefix of one, for the ragged last block)
    of frames [f-21, f-16), in place, so copies chain. With 5 ∤ 21 the blocks drift mod 21, so the "same block
    mod window" shortcut does not hold here; the chained invariant does.
    """
    noise = freenoise_noise((1, 16, 81, 2, 3), _gen(7), window=21, stride=5)
    sources = _first_window_sources(noise, 21)
    assert sources[:21] == list(range(21))
    for start in range(21, 81, 5):
        block = sources[start : start + 5]
        pool = sources[start - 21 : start - 16]
        assert len(set(block)) == len(block) and set(block) <= set(pool)
        if len(block) == 5:
            assert sorted(block) == sorted(pool)


def test_freenoise_frame_dim_other_than_two():
    """frame_dim=1 ((B, F, C, H, W)) gives the same structure along dim 1."""
    noise = freenoise_noise((1, 24, 2, 3, 3), _gen(0), frame_dim=1, window=8, stride=4)
    sources = _first_window_sources(noise.transpose(1, 2), 8)
    assert all(sources[t] // 4 == (t % 8) // 4 for t in range(8, 24))


def test_seed_reproducibility():
    shape = (1, 4, 40, 4, 4)
    a = freenoise_noise(shape, _gen(11))
    assert torch.equal(a, freenoise_noise(shape, _gen(11)))
    assert not torch.allclose(a, freenoise_noise(shape, _gen(12)))


def test_dtype_and_device_arguments():
    noise = freenoise_noise((1, 2, 20, 2, 2), _gen(0), dtype=torch.float64, device="cpu")
    assert noise.dtype == torch.float64 and noise.device.type == "cpu"


class _DiffusersFreeNoise(AnimateDiffFreeNoiseMixin):
    """The attributes diffusers' _prepare_latents_free_noise reads, nothing else."""

    vae_scale_factor = 8
    _free_noise_context_length = 16
    _free_noise_context_stride = 4
    _free_noise_noise_type = "shuffle_context"


@pytest.mark.parametrize("num_frames", [24, 64, 66])
def test_equals_diffusers_shuffle_context(num_frames):
    expected = _DiffusersFreeNoise()._prepare_latents_free_noise(
        2, 4, num_frames, 32, 40, torch.float32, torch.device("cpu"), _gen(0)
    )
    ours = freenoise_noise((2, 4, num_frames, 4, 5), _gen(0), window=16, stride=4)
    assert torch.equal(ours, expected)


def test_builders_share_one_signature():
    for name, builder in NOISE_BUILDERS.items():
        out = builder((1, 2, 18, 2, 2), _gen(0), dtype=torch.float32, device="cpu", frame_dim=2)
        assert out.shape == (1, 2, 18, 2, 2), name


@pytest.mark.parametrize("window,stride", [(0, 1), (16, 0), (16, 17)])
def test_bad_window_raises(window, stride):
    with pytest.raises(ValueError, match="window|stride"):
        freenoise_noise((1, 1, 32, 1, 1), _gen(0), window=window, stride=stride)
