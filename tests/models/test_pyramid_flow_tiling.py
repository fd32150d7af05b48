"""Pyramid Flow's causal VAE in spatial tiles (notes §3.3): the streamed tiled decode and the tiled encode against
references written out here (every tile plain-decoded / encoded alone, stitched by a line-by-line AutoencoderKL
blend), the untiled pass when the frame fits the tile, a blend that really happens, and ``model.options.vae_tile``
(validation and the adapter's use of it). A tiny random-weight VAE, float32 on the CPU."""

import pytest
import torch

from longvid.models.pyramid_flow.vae import TILE_OVERLAP, CausalVideoVAE

TILE = 64  # pixels: tiles of 8 latent px at a stride of 6 (48 px), blended over 16 px, each kept to 48 × 48
BLEND, KEEP = int(TILE * TILE_OVERLAP), TILE - int(TILE * TILE_OVERLAP)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return CausalVideoVAE(channels=(8, 16, 16, 16), encoder_layers=1, decoder_layers=1, groups=4).eval()


def reference_blend(rows: list[list[torch.Tensor]], extent: int, keep: int) -> torch.Tensor:
    """AutoencoderKL's stitch written out (its ``blend_v`` / ``blend_h`` loops on the last two dims): in raster
    order each tile takes, line by line, ``a·(1 − y/n) + b·y/n`` from the (already blended) tile above, then
    column by column from the one on its left, and keeps its top-left ``keep × keep``. Works on copies."""
    rows = [[t.clone() for t in row] for row in rows]
    for i, row in enumerate(rows):
        for j, b in enumerate(row):
            if i > 0:
                a = rows[i - 1][j]
                n = min(a.shape[-2], b.shape[-2], extent)
                for y in range(n):
                    b[..., y, :] = a[..., -n + y, :] * (1 - y / n) + b[..., y, :] * (y / n)
            if j > 0:
                a = row[j - 1]
                n = min(a.shape[-1], b.shape[-1], extent)
                for x in range(n):
                    b[..., :, x] = a[..., :, -n + x] * (1 - x / n) + b[..., :, x] * (x / n)
    return torch.cat([torch.cat([t[..., :keep, :keep] for t in row], dim=-1) for row in rows], dim=-2)


def decoded_tiles(vae, z: torch.Tensor) -> list[list[torch.Tensor]]:
    """Every latent tile decoded alone over all its frames in one plain pass, not clamped (the official decode
    clamps the blended frame, not the tiles)."""
    size = TILE // 8
    stride = int(size * (1 - TILE_OVERLAP))
    return [[vae.decoder(vae.post_quant_conv(z[..., i:i + size, j:j + size]), first=True)
             for j in range(0, z.shape[-1], stride)] for i in range(0, z.shape[-2], stride)]


def _latents(frames=4, height=12, width=14, seed=0):
    # 12 × 14 latents = 96 × 112 px: tile rows at 0, 6 (the last one 6 high), columns at 0, 6, 12 (the last 2 wide,
    # so a border tile smaller than the blend is covered too)
    return torch.randn(1, 16, frames, height, width, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("window", [1, 2])
def test_streamed_tiled_decode_equals_each_tile_decoded_alone_then_blended(vae, window):
    z = _latents()
    chunks = list(vae.decode_chunks(z, window=window, tile=TILE))
    # streamed: the image frame and the first window, then window latents at a time
    assert [c.shape[2] for c in chunks] == ([9, 8, 8] if window == 1 else [17, 8])
    tiled = torch.cat(chunks, dim=2)
    reference = reference_blend(decoded_tiles(vae, z), BLEND, KEEP).clamp(-1.0, 1.0)
    assert tiled.shape == reference.shape == (1, 3, 25, 96, 112)
    assert (tiled - reference).abs().max() <= 1e-5


@torch.no_grad()
def test_a_frame_that_fits_the_tile_decodes_untiled_exactly(vae):
    z = _latents(frames=3, height=8, width=16)  # 64 × 128 px
    untiled = torch.cat(list(vae.decode_chunks(z)), dim=2)
    for tile in (128, 256):  # equal to the frame's longer side, or larger
        assert torch.equal(torch.cat(list(vae.decode_chunks(z, tile=tile)), dim=2), untiled)
    # larger than the tile in one direction only: tiled, and then the pixels change
    tiled = torch.cat(list(vae.decode_chunks(z, tile=TILE)), dim=2)
    assert tiled.shape == untiled.shape and (tiled - untiled).abs().max() > 1e-2


@torch.no_grad()
def test_the_tiles_are_blended_across_their_overlap(vae):
    z = _latents(frames=2)
    tiled = torch.cat(list(vae.decode_chunks(z, tile=TILE)), dim=2)
    tiles = decoded_tiles(vae, z)
    stitched = torch.cat([torch.cat([t[..., :KEEP, :KEEP] for t in row], -1) for row in tiles], -2).clamp(-1, 1)
    plain = vae.decode(z)
    # the top-left tile's own corner is never blended: the tile as decoded alone
    assert (tiled[..., :KEEP, :KEEP] - stitched[..., :KEEP, :KEEP]).abs().max() <= 1e-5
    # the seams (the first BLEND rows of the second tile row, the first BLEND columns of the second tile column)
    # are not a plain stitch of the crops: the tiles were faded into each other
    seam = slice(KEEP, KEEP + BLEND)
    rows_changed = (tiled[..., seam, :] - stitched[..., seam, :]).abs().amax(dim=(0, 1, 2, 4))  # per seam row
    cols_changed = (tiled[..., seam] - stitched[..., seam]).abs().amax(dim=(0, 1, 2, 3))  # per seam column
    assert rows_changed.min() > 1e-3 and cols_changed.min() > 1e-3
    # just past a seam the lower tile holds alone again
    rest = slice(KEEP + BLEND, 2 * KEEP)
    assert (tiled[..., rest, :KEEP] - stitched[..., rest, :KEEP]).abs().max() <= 1e-5
    # and tiling is not the whole-frame decode (the mid-block attention sees one tile at a time)
    assert (tiled - plain).abs().max() > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 9])
def test_tiled_encode_blends_the_moments_then_samples_once(vae, frames):
    x = torch.rand(1, 3, frames, 96, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    stride = int(TILE * (1 - TILE_OVERLAP))  # 48 px: tile rows at 0, 48, columns at 0, 48, 96 (16 px wide)
    rows = [[vae.quant_conv(vae.encoder(x[..., i:i + TILE, j:j + TILE])) for j in range(0, 112, stride)]
            for i in range(0, 96, stride)]
    size = TILE // 8
    moments = reference_blend(rows, int(size * TILE_OVERLAP), size - int(size * TILE_OVERLAP))
    mean, logvar = moments.chunk(2, dim=1)
    g = torch.Generator().manual_seed(5)
    reference = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=g)

    g_tiled, g_plain = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    tiled = vae.encode(x, generator=g_tiled, tile=TILE)
    plain = vae.encode(x, generator=g_plain)
    assert tiled.shape == reference.shape == (1, 16, 1 + (frames - 1) // 8, 12, 14)
    assert (tiled - reference).abs().max() <= 1e-5
    assert (vae.encode(x, sample=False, tile=TILE) - mean).abs().max() <= 1e-5
    assert (tiled - plain).abs().max() > 1e-3
    # the recipe's generator drew exactly what an untiled encode draws (one normal per latent element)
    assert torch.equal(torch.randn(4, generator=g_tiled), torch.randn(4, generator=g_plain))
    # an image that fits the tile encodes untiled, bit for bit
    small = x[..., :64, :64]
    assert torch.equal(vae.encode(small, sample=False, tile=TILE), vae.encode(small, sample=False))


def test_vae_tile_is_validated_with_one_line_naming_the_option(vae):
    from longvid.errors import RecipeError
    from longvid.models.specs import PyramidFlowOptions
    from longvid.recipe.resolve import resolve

    assert PyramidFlowOptions().vae_tile == 256  # the official default (save_memory=True, README enable_tiling)
    assert PyramidFlowOptions(vae_tile=0).vae_tile == 0 and PyramidFlowOptions(vae_tile=512).vae_tile == 512
    for bad in (100, 32, -64, True):
        with pytest.raises(ValueError, match=r"^model\.options\.vae_tile must be 0 \(no tiling\) or a multiple of 64 "
                                             r"pixels, got .*; use 256") as err:
            PyramidFlowOptions(vae_tile=bad)
        assert "\n" not in str(err.value)
    recipe = {"model": {"family": "pyramid_flow", "path": "tiny:pyramid-flow"}, "prompt": "a fox",
              "video": {"num_frames": 9, "height": 64, "width": 64}, "runtime": {"device": "cpu"}}
    with pytest.raises(RecipeError) as err:
        resolve(recipe, ["model.options.vae_tile=100"])
    assert [str(p) for p in err.value.problems] == [
        "model.options.vae_tile: must be 0 (no tiling) or a multiple of 64 pixels, got 100; use 256 (the official "
        "default) or 512"]
    with pytest.raises(RecipeError) as err:  # a wrong type: omegaconf's reason, also one line under the key
        resolve(recipe, ["model.options.vae_tile=big"])
    assert [str(p) for p in err.value.problems] == [
        "model.options.vae_tile: Value 'big' of type 'str' could not be converted to Integer"]
    assert resolve(recipe, ["model.options.vae_tile=0"]).model.options["vae_tile"] == 0
    with pytest.raises(ValueError, match="multiple of 32"):  # the VAE's own floor, for direct callers
        next(vae.decode_chunks(_latents(frames=1), tile=40))


@torch.no_grad()
def test_the_adapter_decodes_and_encodes_with_the_runs_vae_tile(tmp_path):
    from PIL import Image

    from longvid import runner
    from longvid.models.pyramid_flow.vae import LATENT_STATS, denormalize
    from longvid.recipe.resolve import resolve

    def recipe(tile):
        return resolve({"model": {"family": "pyramid_flow", "path": "tiny:pyramid-flow",
                                  "options": {"vae_tile": tile}},
                        "prompt": "a fox", "video": {"num_frames": 17, "height": 64, "width": 128},
                        "runtime": {"device": "cpu"}})

    adapter = runner.load_adapter(recipe(64))
    try:
        vae, kind = adapter.pipe.vae, adapter.pipe.kind
        latents = torch.randn(1, 16, 3, 8, 16, generator=torch.Generator().manual_seed(4))
        z = denormalize(latents, LATENT_STATS[kind])
        Image.new("RGB", (128, 64), (200, 60, 30)).save(tmp_path / "red.png")
        decoded, encoded = {}, {}
        for tile in (64, 0):
            adapter.check_run(recipe(tile))  # model.options is per run: check_run takes the run's tile
            decoded[tile] = torch.cat(list(adapter.decode_stream(latents)), dim=2)
            encoded[tile] = adapter.encode_image(str(tmp_path / "red.png"), 64, 128, torch.Generator().manual_seed(1))
        assert torch.equal(decoded[64], torch.cat(list(vae.decode_chunks(z, tile=64)), dim=2))
        assert torch.equal(decoded[0], torch.cat(list(vae.decode_chunks(z)), dim=2))
        assert (decoded[64] - decoded[0]).abs().max() > 1e-3
        assert torch.equal(encoded[0], adapter.encode_image(str(tmp_path / "red.png"), 64, 128,
                                                            torch.Generator().manual_seed(1), tile=0))
        assert (encoded[64] - encoded[0]).abs().max() > 1e-4
    finally:
        adapter.close()
