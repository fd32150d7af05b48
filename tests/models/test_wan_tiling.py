"""Wan's VAE in spatial tiles, streamed: every decoded frame and every encoded latent equals diffusers' own tiled
``decode`` / ``encode`` (``vae.enable_tiling``), for the 8x VAE (Wan 2.1) and the patchified 16x one (TI2V-5B)."""

import pytest
import torch

from longvid import runner
from longvid.recipe.resolve import resolve
from longvid.recipe.schema import RuntimeConfig
from tests.helpers import wan_recipe

TILES = dict(tile_sample_min_height=32, tile_sample_min_width=48, tile_sample_stride_height=24,
             tile_sample_stride_width=32)


@pytest.fixture(scope="module", params=["wan", "wan2.2-ti2v"])
def adapter(request):
    a = runner.load_adapter(resolve(wan_recipe(f"tiny:{request.param}", height=64, width=128)))
    yield a
    a.pipe.vae.disable_tiling()
    a.close()


def _latents(adapter, frames=9, height=96, width=128):
    torch.manual_seed(0)
    return torch.randn(adapter.latent_shape(frames, height, width))


def test_streamed_tiled_decode_equals_diffusers_tiled_decode(adapter):
    vae = adapter.pipe.vae
    vae.enable_tiling(**TILES)
    z = _latents(adapter)
    tiled = torch.cat(list(adapter.decode_stream(z, RuntimeConfig(vae_tiling=True))), dim=2)
    plain = torch.cat(list(adapter.decode_stream(z, RuntimeConfig())), dim=2)
    # diffusers on the same de-normalised latents (WanPipeline's op order)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        reference = vae.decode(z / inv_std + mean, return_dict=False)[0]
    assert tiled.shape == reference.shape == plain.shape
    assert torch.equal(tiled, reference)
    assert (tiled - plain).abs().max() > 1e-4  # the tiles really differ from one whole-frame decode


def test_streamed_tiled_encode_equals_diffusers_tiled_encode(adapter):
    vae = adapter.pipe.vae
    vae.enable_tiling(**TILES)
    torch.manual_seed(1)
    video = torch.rand(1, 3, 9, 96, 128) * 2 - 1
    chunks = [video[:, :, :1]] + [video[:, :, i:i + 4] for i in range(1, 9, 4)]
    tiled = adapter.encode_stream(iter(chunks), RuntimeConfig(vae_tiling=True))
    plain = adapter.encode_stream(iter(chunks), RuntimeConfig())
    with torch.no_grad():
        mode = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    reference = (mode - mean) * inv_std
    assert tiled.shape == reference.shape
    assert torch.equal(tiled, reference)
    assert (tiled - plain).abs().max() > 1e-4


def test_a_frame_within_one_tile_is_not_tiled(adapter):
    vae = adapter.pipe.vae
    vae.enable_tiling(tile_sample_min_height=512, tile_sample_min_width=512, tile_sample_stride_height=384,
                      tile_sample_stride_width=384)
    z = _latents(adapter)
    tiled = torch.cat(list(adapter.decode_stream(z, RuntimeConfig(vae_tiling=True))), dim=2)
    plain = torch.cat(list(adapter.decode_stream(z, RuntimeConfig())), dim=2)
    assert torch.equal(tiled, plain)


def test_animatediff_uses_diffusers_tiling_for_the_call_only():
    adapter = runner.load_adapter(resolve({"model": {"family": "animatediff", "path": "tiny:animatediff"},
                                           "video": {"num_frames": 8, "height": 64, "width": 64},
                                           "runtime": {"device": "cpu"}}))
    try:
        vae = adapter.pipe.vae
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_latent_min_size = 4  # diffusers' SD VAE tiles, sized for the tiny VAE
        vae.tile_sample_min_size = 4 * scale
        z = torch.randn(1, 4, 2, 8, 8)
        tiled = torch.cat(list(adapter.decode_stream(z, RuntimeConfig(vae_tiling=True))), dim=2)
        plain = torch.cat(list(adapter.decode_stream(z, RuntimeConfig())), dim=2)
        assert vae.use_tiling is False  # restored
        frames = (1 / vae.config.scaling_factor * z)[0].permute(1, 0, 2, 3)  # (f, C, h, w), the adapter's op order
        vae.use_tiling = True
        with torch.no_grad():
            reference = vae.decode(frames).sample.permute(1, 0, 2, 3)[None]
        vae.use_tiling = False
        assert torch.equal(tiled, reference) and (tiled - plain).abs().max() > 1e-4
    finally:
        adapter.close()
