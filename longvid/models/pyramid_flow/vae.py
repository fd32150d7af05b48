"""Pyramid Flow's causal video VAE (MAGVIT-v2-like, 3-D causal convolutions), written from the notes (§3).

8× spatial and 8× causal temporal compression: ``1 + 8k`` frames <-> ``1 + k`` latents of 16 channels. Module and
parameter names are the released checkpoint's (``causal_video_vae/``), so its state dict loads strictly.

- :class:`CausalConv3d` pads time with ``k_t − 1`` zeros in front only (nothing from the future) and space
  symmetrically; GroupNorm runs per frame, so no statistic crosses time.
- Decoding in chunks is exact: every causal convolution hands the frames the next chunk needs (``k_t − s_t`` of
  its padded input) to a :class:`ChunkState`, and the temporal upsamplers drop their first output frame only in
  the first chunk (the causal "image" frame), so ``decode_chunks`` equals ``decode`` and memory holds one chunk.
- The first latent frame (the image) and the video latents are normalised with different statistics
  (:data:`LATENT_STATS`); decoding a video latent with the image statistics burns colours.
- Spatial tiling (notes §3.3; diffusers AutoencoderKL's ``tiled_decode`` / ``tiled_encode`` convention): square
  tiles of ``tile`` pixels overlapping by :data:`TILE_OVERLAP`, blended linearly over the overlap and cropped to
  their stride. The tiled decode still streams: every tile keeps its own :class:`ChunkState`, so each tile's
  chunked decode equals that tile's plain decode, and the tiles of one chunk are blended as soon as they exist
  (the blend is per frame). Tiling changes the pixels (the mid-block attention sees one tile, not the frame),
  which is why the tile size is a setting that parity has to fix, not a free memory knob.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

#: ``(image shift, image scale, video shift, video scale)`` per checkpoint family: ``z_norm = (z − shift)·scale``.
LATENT_STATS = {"miniflux": (-0.04, 1 / 1.8726, -0.2343, 1 / 3.0986),
                "sd3": (0.1490, 1 / 1.8415, -0.2343, 1 / 3.0986)}

#: Overlap of neighbouring tiles, as a fraction of the tile (official since commit 0105b51; 1/8 left visible seams,
#: issue #131): stride ``(1 − 1/4)·tile``, blended over ``tile/4`` px, each tile cropped to its stride.
TILE_OVERLAP = 0.25


class ChunkState:
    """Per-convolution carry between chunks of one chunked pass (``None`` = a plain pass over the whole clip)."""

    def __init__(self):
        self.frames: dict[int, torch.Tensor] = {}
        self.first = True


class CausalConv3d(nn.Module):
    """``nn.Conv3d`` (as ``.conv``) with causal time padding (zeros in front) and symmetric spatial padding."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int, int] | int = 1):
        super().__init__()
        stride = (stride, 1, 1) if isinstance(stride, int) else stride
        self.kt, self.st = kernel, stride[0]
        self.space = kernel // 2
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=0)

    def forward(self, x: torch.Tensor, state: ChunkState | None = None) -> torch.Tensor:  # (B, C, T, H, W)
        x = F.pad(x, (self.space, self.space, self.space, self.space))
        keep = self.kt - self.st  # frames of the padded input the next chunk needs in front
        carried = state.frames.get(id(self)) if state is not None else None
        if carried is None:
            x = F.pad(x, (0, 0, 0, 0, self.kt - 1, 0))
        else:
            x = torch.cat([carried, x], dim=2)
        if state is not None and keep > 0:
            state.frames[id(self)] = x[:, :, -keep:].detach()
        return self.conv(x)


def frame_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm on every frame alone: ``(B, C, T, H, W)`` as ``(B·T, C, H, W)``."""
    b, c, t, h, w = x.shape
    y = norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class ResnetBlock(nn.Module):
    """GN → SiLU → conv → GN → SiLU → conv, plus the input (through a 1×1×1 causal conv when widths differ)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = CausalConv3d(cout, cout)
        self.conv_shortcut = CausalConv3d(cin, cout, kernel=1) if cin != cout else None

    def forward(self, x, state=None):
        h = self.conv1(F.silu(frame_norm(self.norm1, x)), state)
        h = self.conv2(F.silu(frame_norm(self.norm2, h)), state)
        return h + (self.conv_shortcut(x, state) if self.conv_shortcut is not None else x)


class Sampler(nn.Module):
    """The four resamplers, each a causal conv named ``.conv``: spatial down (stride (1, 2, 2)), temporal down
    (stride (2, 1, 1)), spatial up (conv to 4C, pixel shuffle ``(c p1 p2)``) and temporal up (conv to 2C,
    ``(c p)`` into time, without the first frame of a clip that starts with the image frame)."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        self.kind = kind
        out = {"down": channels, "tdown": channels, "up": 4 * channels, "tup": 2 * channels}[kind]
        stride = {"down": (1, 2, 2), "tdown": (2, 1, 1)}.get(kind, 1)
        self.conv = CausalConv3d(channels, out, stride=stride)

    def forward(self, x, state=None, first: bool = True):
        y = self.conv(x, state)
        b, c, t, h, w = y.shape
        if self.kind == "up":  # b (c p1 p2) t h w -> b c t (h p1) (w p2)
            y = y.reshape(b, c // 4, 2, 2, t, h, w).permute(0, 1, 4, 5, 2, 6, 3).reshape(b, c // 4, t, 2 * h, 2 * w)
        elif self.kind == "tup":  # b (c p) t h w -> b c (t p) h w
            y = y.reshape(b, c // 2, 2, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c // 2, 2 * t, h, w)
            if first:
                y = y[:, :, 1:]
        return y


class MidBlock(nn.Module):
    """resnet → per-frame spatial self-attention (diffusers ``Attention``: one head, GroupNorm, residual) → resnet."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, heads=1, dim_head=channels, norm_num_groups=groups,
                                                   eps=1e-6, bias=True, upcast_softmax=True, residual_connection=True,
                                                   _from_deprecated_attn_block=True)])

    def forward(self, x, state=None):
        x = self.resnets[0](x, state)
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        frames = self.attentions[0](frames)  # (B·T, C, H, W), attention over the H·W positions of each frame
        x = frames.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return self.resnets[1](x, state)


_SAMPLER_NAMES = {"down": "downsamplers", "tdown": "temporal_downsamplers", "up": "upsamplers",
                  "tup": "temporal_upsamplers"}


class _Block(nn.Module):
    """``layers`` resnets, then the block's resamplers in order (``downsamplers``, ``temporal_downsamplers``; or
    ``upsamplers``, ``temporal_upsamplers``): spatial first, then temporal."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, samplers: tuple[str, ...]):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.sampler_names = [_SAMPLER_NAMES[k] for k in samplers]
        for kind, name in zip(samplers, self.sampler_names):
            setattr(self, name, nn.ModuleList([Sampler(kind, cout)]))

    def forward(self, x, state=None, first: bool = True):
        for resnet in self.resnets:
            x = resnet(x, state)
        for name in self.sampler_names:
            x = getattr(self, name)[0](x, state, first)
        return x


class Encoder(nn.Module):
    def __init__(self, channels=(128, 256, 512, 512), layers=2, groups=32, latent=16):
        super().__init__()
        self.conv_in = CausalConv3d(3, channels[0])
        last = len(channels) - 1
        self.down_blocks = nn.ModuleList([
            _Block(channels[max(i - 1, 0)], c, layers, groups, ("down", "tdown") if i < last else ())
            for i, c in enumerate(channels)])
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = CausalConv3d(channels[-1], 2 * latent)

    def forward(self, x, state=None):
        x = self.conv_in(x, state)
        for block in self.down_blocks:
            x = block(x, state)
        x = self.mid_block(x, state)
        return self.conv_out(F.silu(frame_norm(self.conv_norm_out, x)), state)


class Decoder(nn.Module):
    def __init__(self, channels=(128, 256, 512, 512), layers=3, groups=32, latent=16):
        super().__init__()
        up = list(channels)[::-1]  # 512, 512, 256, 128
        self.conv_in = CausalConv3d(latent, up[0])
        self.mid_block = MidBlock(up[0], groups)
        last = len(up) - 1
        self.up_blocks = nn.ModuleList([
            _Block(up[max(i - 1, 0)], c, layers, groups, ("up", "tup") if i < last else ())
            for i, c in enumerate(up)])
        self.conv_norm_out = nn.GroupNorm(groups, up[-1], eps=1e-6)
        self.conv_out = CausalConv3d(up[-1], 3)

    def forward(self, z, state=None, first: bool = True):
        x = self.conv_in(z, state)
        x = self.mid_block(x, state)
        for block in self.up_blocks:
            x = block(x, state, first)
        return self.conv_out(F.silu(frame_norm(self.conv_norm_out, x)), state)


class CausalVideoVAE(nn.Module):
    """The released VAE's modules (``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``) and its passes.
    Defaults are the released sizes; tests pass small ``channels``/``groups``."""

    def __init__(self, channels=(128, 256, 512, 512), encoder_layers=2, decoder_layers=3, groups=32, latent=16):
        super().__init__()
        self.latent = latent
        self.encoder = Encoder(channels, encoder_layers, groups, latent)
        self.decoder = Decoder(channels, decoder_layers, groups, latent)
        self.quant_conv = CausalConv3d(2 * latent, 2 * latent, kernel=1)
        self.post_quant_conv = CausalConv3d(latent, latent, kernel=1)

    def moments(self, x: torch.Tensor, tile: int = 0) -> torch.Tensor:
        """Posterior moments ``(B, 32, 1 + (T−1)/8, H/8, W/8)`` of pixels ``(B, 3, T, H, W)`` in [−1, 1]; with
        ``tile`` (pixels) and a frame larger than it, encoded in tiles and blended in latent space."""
        if (x.shape[2] - 1) % 8:
            raise ValueError(f"the causal VAE encodes 1 + 8k frames, got {x.shape[2]}")
        if not _tiled(x.shape[-2:], tile):
            return self.quant_conv(self.encoder(x))
        stride = int(tile * (1 - TILE_OVERLAP))  # pixels between tile origins
        ys, xs = range(0, x.shape[-2], stride), range(0, x.shape[-1], stride)
        # every tile over all frames at once (the encode is one pass; an i2v image is a single frame):
        # moments (B, 32, T', ≤tile/8, ≤tile/8) per tile, blended and cropped in latent pixels
        rows = [[self.quant_conv(self.encoder(x[..., i:i + tile, j:j + tile])) for j in xs] for i in ys]
        return blend_tiles(rows, int(tile // 8 * TILE_OVERLAP), tile // 8 - int(tile // 8 * TILE_OVERLAP))

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True,
               tile: int = 0) -> torch.Tensor:
        """Latents of pixels: the posterior sample (from ``generator``; the official i2v samples) or its mode.
        Tiled (``tile`` pixels), the blended moments are sampled once, so the generator draws exactly what an
        untiled encode draws: one normal per latent element."""
        mean, logvar = self.moments(x, tile).chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        where = generator.device if generator is not None else mean.device  # a CPU generator: same draw anywhere
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=where).to(mean.device)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, 1 + 8(T−1), H·8, W·8)`` of latents ``(B, 16, T, H, W)`` (the first one the image frame)."""
        return self.decoder(self.post_quant_conv(z), first=True).clamp(-1.0, 1.0)

    def decode_chunks(self, z: torch.Tensor, window: int = 1, tile: int = 0) -> Iterator[torch.Tensor]:
        """:meth:`decode` in chunks, exactly: latents ``[0, window + 1)`` first, then ``window`` at a time; yields
        each chunk's frames (``1 + 8·window``, then ``8·window``). With ``tile`` (pixels) and a frame larger than
        it, every chunk is decoded in spatial tiles and blended (see the module notes); otherwise untiled."""
        if _tiled((8 * z.shape[-2], 8 * z.shape[-1]), tile):
            yield from self._decode_tiled_chunks(z, window, tile)
            return
        state = ChunkState()
        for start, stop in _chunks(z.shape[2], window):
            part = self.post_quant_conv(z[:, :, start:stop], state)
            yield self.decoder(part, state, first=(start == 0)).clamp(-1.0, 1.0)

    def _decode_tiled_chunks(self, z: torch.Tensor, window: int, tile: int) -> Iterator[torch.Tensor]:
        size = tile // 8  # latent pixels per tile
        stride = int(size * (1 - TILE_OVERLAP))  # latent pixels between tile origins
        blend = int(tile * TILE_OVERLAP)  # output pixels faded from one tile into the next
        ys, xs = range(0, z.shape[-2], stride), range(0, z.shape[-1], stride)
        # one carry per tile: a tile's chunks then equal that tile decoded alone over all frames
        states = {(i, j): ChunkState() for i in ys for j in xs}
        for start, stop in _chunks(z.shape[2], window):
            rows = []
            for i in ys:
                row = []
                for j in xs:
                    state = states[i, j]
                    part = self.post_quant_conv(z[:, :, start:stop, i:i + size, j:j + size], state)
                    # (B, 3, f, ≤tile, ≤tile), not clamped: the official decode blends first and clamps the result
                    row.append(self.decoder(part, state, first=(start == 0)))
                rows.append(row)
            yield blend_tiles(rows, blend, tile - blend).clamp(-1.0, 1.0)  # (B, 3, f, 8·H, 8·W)


def _chunks(frames: int, window: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` latent ranges of a chunked decode: ``window + 1`` first (the image frame and the first
    video latents), then ``window`` at a time."""
    start, stop = 0, min(window + 1, frames)
    while start < frames:
        yield start, stop
        start, stop = stop, min(stop + window, frames)


def check_tile(tile: int) -> None:
    """A tile (pixels) whose stride and blend are whole latent pixels at :data:`TILE_OVERLAP`: a multiple of 32."""
    if tile < 32 or tile % 32:
        raise ValueError(f"a VAE tile is a multiple of 32 pixels, got {tile}")


def _tiled(size: tuple[int, int], tile: int) -> bool:
    """Whether a frame of ``(H, W)`` pixels is tiled: only when ``tile`` (0 = never) is smaller in a direction,
    as in the official VAE (a frame that fits decodes whole, exactly the untiled pass)."""
    if tile:
        check_tile(tile)
    return tile > 0 and (size[0] > tile or size[1] > tile)


def blend_tiles(rows: list[list[torch.Tensor]], blend: int, keep: int) -> torch.Tensor:
    """Stitch a raster grid of overlapping tiles ``(..., h, w)`` into one ``(..., H, W)``, as diffusers'
    AutoencoderKL does: in raster order every tile fades in, over its first ``blend`` rows, from the last rows of
    the tile above, then over its first ``blend`` columns from the last columns of the tile on its left (both
    neighbours already blended: the tiles are rewritten in place), and keeps its top-left ``keep × keep``."""
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _fade(rows[i - 1][j], tile, blend, dim=-2)
            if j > 0:
                _fade(row[j - 1], tile, blend, dim=-1)
    return torch.cat([torch.cat([t[..., :keep, :keep] for t in row], dim=-1) for row in rows], dim=-2)


def _fade(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """In place: ``b[k] = a[−n + k]·(1 − k/n) + b[k]·k/n`` for ``k < n`` along ``dim`` (a linear ramp from ``a``'s
    overlap into ``b``), ``n = extent`` or less when a tile at the border is smaller."""
    n = min(a.shape[dim], b.shape[dim], extent)
    ramp = torch.arange(n, dtype=torch.float64) / n  # k/n; both weights rounded once from float64, as diffusers'
    shape = [n] + [1] * (-dim - 1)  # broadcast along dim (-2: rows, -1: columns)
    dtype = torch.promote_types(b.dtype, torch.float32)  # bf16 tiles blend in float32
    w_a, w_b = ((w.to(b.device, dtype)).reshape(shape) for w in (1 - ramp, ramp))
    head = b.narrow(dim, 0, n)
    head.copy_(a.narrow(dim, a.shape[dim] - n, n) * w_a + head * w_b)


def normalize(z: torch.Tensor, stats: tuple[float, float, float, float]) -> torch.Tensor:
    """``(z − shift)·scale`` with the image statistics on latent frame 0 and the video ones after."""
    img_shift, img_scale, vid_shift, vid_scale = stats
    return torch.cat([(z[:, :, :1] - img_shift) * img_scale, (z[:, :, 1:] - vid_shift) * vid_scale], dim=2)


def denormalize(z: torch.Tensor, stats: tuple[float, float, float, float], first_is_image: bool = True) -> torch.Tensor:
    """Inverse of :func:`normalize` (``first_is_image=False`` for a slice that starts after frame 0)."""
    img_shift, img_scale, vid_shift, vid_scale = stats
    if not first_is_image:
        return z / vid_scale + vid_shift
    return torch.cat([z[:, :, :1] / img_scale + img_shift, z[:, :, 1:] / vid_scale + vid_shift], dim=2)
