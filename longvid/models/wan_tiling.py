"""Wan's VAE in overlapping spatial tiles, streamed one latent frame (or pixel chunk) at a time.

diffusers' ``AutoencoderKLWan.tiled_decode`` / ``tiled_encode`` bound the VAE's activations at 1080p and 4K by
running each spatial tile through *all* frames (one feature cache alive at a time) and blending the tiles at the
end, which holds the whole decoded video in memory. longvid streams instead: every tile keeps its own causal
feature cache, each latent frame is decoded tile by tile, and the tiles of that frame are blended at once with
the VAE's own ``blend_v`` / ``blend_h`` in diffusers' order. Blending is per pixel and per frame, so the frames
are exactly diffusers' tiled result (tested), while memory holds one frame's tiles plus the caches (one frame's
feature maps at each conv, as the untiled stream). Tile sizes are the VAE's (``vae.enable_tiling(...)`` sets
them; 256-pixel tiles, stride 192 by default).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch


def decode_tiled(vae, z: torch.Tensor) -> Iterator[torch.Tensor]:
    """Frames of the VAE latents ``z`` (B, C, F, h, w) (already de-normalised), one latent frame at a time,
    ``(B, 3, f, H, W)`` clamped to [-1, 1]: diffusers' ``tiled_decode`` frame by frame."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    _, _, frames, height, width = z.shape
    ratio, patch = vae.spatial_compression_ratio, vae.config.patch_size
    tile_h, tile_w = vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio
    step_h, step_w = vae.tile_sample_stride_height // ratio, vae.tile_sample_stride_width // ratio
    out_h, out_w = height * ratio, width * ratio
    keep_h, keep_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    blend_h, blend_w = vae.tile_sample_min_height - keep_h, vae.tile_sample_min_width - keep_w
    if patch is not None:  # the same arithmetic as tiled_decode for patchified VAEs (Wan 2.2 TI2V)
        out_h, out_w, keep_h, keep_w = out_h // patch, out_w // patch, keep_h // patch, keep_w // patch
        blend_h = vae.tile_sample_min_height // patch - keep_h
        blend_w = vae.tile_sample_min_width // patch - keep_w
    tiles = [(i, j) for i in range(0, height, step_h) for j in range(0, width, step_w)]
    caches = {t: [None] * vae._cached_conv_counts["decoder"] for t in tiles}
    for k in range(frames):
        decoded = {}
        for i, j in tiles:
            tile = vae.post_quant_conv(z[:, :, k:k + 1, i:i + tile_h, j:j + tile_w])
            decoded[i, j] = vae.decoder(tile, feat_cache=caches[i, j], feat_idx=[0], first_chunk=(k == 0))
        frame = _blend(vae, decoded, range(0, height, step_h), range(0, width, step_w), blend_h, blend_w,
                       keep_h, keep_w)[:, :, :, :out_h, :out_w]
        if patch is not None:
            frame = unpatchify(frame, patch_size=patch)
        yield frame.clamp(-1.0, 1.0)


def encode_tiled(vae, chunks: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Moments ``(B, 2C, F', h, w)`` of pixel chunks (1 frame, then 4 each): diffusers' ``tiled_encode`` chunk by
    chunk, each tile with its own causal cache."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

    patch = vae.config.patch_size
    ratio = vae.spatial_compression_ratio // (patch or 1)
    size_h, size_w = vae.tile_sample_min_height, vae.tile_sample_min_width
    step_h, step_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    keep_h, keep_w = step_h // ratio, step_w // ratio
    blend_h, blend_w = size_h // ratio - keep_h, size_w // ratio - keep_w
    caches: dict = {}
    parts = []
    for chunk in chunks:  # (B, 3, f, H, W)
        x = chunk.to(device, vae.dtype)
        if patch is not None:
            x = patchify(x, patch_size=patch)
        _, _, _, height, width = x.shape
        encoded = {}
        for i in range(0, height, step_h):
            for j in range(0, width, step_w):
                cache = caches.setdefault((i, j), [None] * vae._cached_conv_counts["encoder"])
                tile = vae.encoder(x[:, :, :, i:i + size_h, j:j + size_w], feat_cache=cache, feat_idx=[0])
                encoded[i, j] = vae.quant_conv(tile)
        part = _blend(vae, encoded, range(0, height, step_h), range(0, width, step_w), blend_h, blend_w,
                      keep_h, keep_w)
        parts.append(part[:, :, :, :height // ratio, :width // ratio])
    return torch.cat(parts, dim=2)


def _blend(vae, tiles: dict, rows, cols, blend_h: int, blend_w: int, keep_h: int, keep_w: int) -> torch.Tensor:
    """diffusers' tile blending, in its order: each tile blended in place with the (already blended) tile above
    and to its left, then cropped to the stride; rows concatenated."""
    out_rows = []
    rows, cols = list(rows), list(cols)
    for a, i in enumerate(rows):
        out_row = []
        for b, j in enumerate(cols):
            tile = tiles[i, j]
            if a > 0:
                tile = vae.blend_v(tiles[rows[a - 1], j], tile, blend_h)
            if b > 0:
                tile = vae.blend_h(tiles[i, cols[b - 1]], tile, blend_w)
            out_row.append(tile[:, :, :, :keep_h, :keep_w])
        out_rows.append(torch.cat(out_row, dim=-1))
    return torch.cat(out_rows, dim=3)
