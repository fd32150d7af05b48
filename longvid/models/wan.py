"""Wan 2.1 / 2.2 text-to-video (diffusers ``WanPipeline`` components).

Covers Wan 2.1 T2V (1.3B, 14B), Wan 2.2 A14B (a high-noise ``transformer`` and a low-noise
``transformer_2`` switched at ``boundary_ratio``) and Wan 2.2 TI2V-5B (``expand_timesteps``: one timestep
per token; 48-channel patchified VAE). The denoising maths mirrors diffusers==0.42.1 ``WanPipeline.__call__``
(cond and uncond as two calls, as the pipeline does), so vanilla generation equals the pipeline's output.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn

from longvid.core.context import AttentionSite, TokenLayout
from longvid.core.processors import AttentionOp, GroupedOutput, head_groups, op_active, plain_linear
from longvid.models.base import Conditioning, ModelAdapter, uses_cfg, vae_device
from longvid.models.specs import WAN
from longvid.models.wan_tiling import decode_tiled, encode_tiled
from longvid.recipe.schema import RuntimeConfig, SamplerConfig


class WanRotary:
    """Wan's 3-axis rotary positions for one attention call, handed to ops that ask for q/k before RoPE.

    ``cos``/``sin``: the tables of the current token grid, ``(1, 1, S, D)`` (SDPA layout, broadcast over
    heads), as ``WanRotaryPosEmbed`` computed them. ``grid``: the ``(F, H, W)`` token grid. :meth:`tables`
    builds tables for any integer positions per axis (a remapped temporal axis, say) from the module's
    per-axis tables, so an op can re-encode positions without copying RoPE code.
    """

    def __init__(self, rotary_emb: tuple[torch.Tensor, torch.Tensor], module: torch.nn.Module,
                 grid: tuple[int, int, int]):
        cos, sin = rotary_emb  # (1, S, 1, D)
        self.cos, self.sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (1, 1, S, D)
        self.module = module
        self.grid = grid

    def apply(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x`` (N, heads, S, D) by the grid's positions (or by ``cos``/``sin`` from :meth:`tables`)."""
        return rotate_pairs(x, self.cos if cos is None else cos, self.sin if sin is None else sin)

    def tables(self, f_pos: torch.Tensor, h_pos: torch.Tensor, w_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``(1, 1, S, D)`` for per-token integer positions on each axis (each ``(S,)``)."""
        m = self.module
        split = [m.t_dim, m.h_dim, m.w_dim]
        out = []
        for table in (m.freqs_cos, m.freqs_sin):
            t_tab, h_tab, w_tab = table.split(split, dim=1)
            out.append(torch.cat([t_tab[f_pos], h_tab[h_pos], w_tab[w_pos]], dim=-1)[None, None])  # (1, 1, S, D)
        return out[0], out[1]


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair rotary embedding (same op order as diffusers 0.42.1 ``WanAttnProcessor``).
    Elementwise, so any layout works as long as ``cos``/``sin`` broadcast against ``x``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanOpProcessor:
    """Wan self-attention with the attention core replaced by a longvid op, one head group at a time.

    Adapted from diffusers==0.42.1 ``transformer_wan.WanAttnProcessor.__call__`` (changes: self-attention only;
    the core is ``op(q, k, v, layout)`` in SDPA layout; v, RoPE, the op and the output projection run per
    head group). q and k are projected whole because Wan's q/k RMSNorm spans all heads; the op's working set
    (FreeLong's two branches and blend) is bounded by the group, as in ``OpAttnProcessor``. When the op is
    inactive (a step window) or absent, attention goes through diffusers' ``dispatch_attention_fn`` with this
    processor's backend and context-parallel config, exactly as the vanilla processor. An op with
    ``pre_rope = True`` gets q/k before RoPE and a :class:`WanRotary`. tests/models/test_upstream.py pins the
    upstream source so a diffusers upgrade fails loudly instead of drifting.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, site: AttentionSite, op: AttentionOp, rope: torch.nn.Module | None = None,
                 group_bytes: int = 256 << 20):
        self.site = site
        self.op = op
        self.rope = rope
        self.group_bytes = group_bytes

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.site.name}: longvid attention ops patch self-attention without masks only")
        n, seq, _ = hidden_states.shape  # (B, S, C)
        heads = attn.heads
        if attn.fused_projections:
            q, k, v_all = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:  # v per head group from the weight rows, unless to_v is wrapped (LoRA) or offloaded: call it then
            q, k = attn.to_q(hidden_states), attn.to_k(hidden_states)
            v_all = None if plain_linear(attn.to_v) else attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)  # (B, S, heads*D); the RMSNorm spans all heads
        head_dim = q.shape[-1] // heads
        active = op_active(self.op)
        if not active or self._parallel_config is not None:
            group = heads  # context parallelism splits heads itself; the vanilla path needs no groups
        else:
            group = head_groups(heads, 3 * n * seq * head_dim * q.element_size(), self.group_bytes)
        rotary = None
        if active and getattr(self.op, "pre_rope", False) and rotary_emb is not None:
            rotary = WanRotary(rotary_emb, self.rope, (self.site.layout.frames, self.site.layout.height,
                                                       self.site.layout.width))
        out_proj = GroupedOutput(attn.to_out[0], n * seq, hidden_states, attn.inner_dim)
        for h0 in range(0, heads, group):
            cols = slice(h0 * head_dim, min(h0 + group, heads) * head_dim)
            v = v_all[..., cols] if v_all is not None else F.linear(hidden_states, attn.to_v.weight[cols],
                                                                    attn.to_v.bias[cols])
            qg, kg, vg = (t.unflatten(2, (-1, head_dim)) for t in (q[..., cols], k[..., cols], v))  # (B, S, g, D)
            if active:
                out = self._op(qg, kg, vg, rotary_emb, rotary)  # (B, S, g, D)
            else:
                out = self._vanilla(qg, kg, vg, rotary_emb)
            out_proj.add(out.flatten(2, 3).type_as(q).reshape(n * seq, -1), cols)
        return attn.to_out[1](out_proj.result().view(n, seq, -1))

    def _vanilla(self, q, k, v, rotary_emb):
        if rotary_emb is not None:
            q, k = rotate_pairs(q, *rotary_emb), rotate_pairs(k, *rotary_emb)
        return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)

    def _op(self, q, k, v, rotary_emb, rotary):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, g, S, D)
        if rotary is not None:
            out = self.op(q, k, v, self.site.layout, rotary=rotary)
        else:
            if rotary_emb is not None:
                cos, sin = (t.transpose(1, 2) for t in rotary_emb)  # (1, 1, S, D)
                q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
            out = self.op(q, k, v, self.site.layout)
        return out.transpose(1, 2)  # (B, S, g, D)


class WanAdapter(ModelAdapter):
    spec = WAN
    op_processor = WanOpProcessor
    pipeline_class = "WanPipeline"
    denoiser_names = ("transformer", "transformer_2")
    batched_cfg = False  # WanPipeline calls the model once for cond, once for uncond

    # ------------------------------------------------------------------------------- conditioning

    def encode(self, prompt: str, negative: str, sampler: SamplerConfig) -> Conditioning:
        cfg = uses_cfg(sampler)
        pos, neg = self.pipe.encode_prompt(prompt=prompt, negative_prompt=negative,
                                           do_classifier_free_guidance=cfg, num_videos_per_prompt=1,
                                           max_sequence_length=sampler.max_sequence_length, device=self.device)
        return Conditioning(pos.to(self.dtype), neg.to(self.dtype) if neg is not None else None)

    # ---------------------------------------------------------------------------------- denoising

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        vae = self.pipe.vae
        s = self.pipe.vae_scale_factor_spatial
        return (1, vae.config.z_dim, self.latent_frames(num_frames), height // s, width // s)

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        _, _, f, h, w = self.latent_shape(num_frames, height, width)
        p_t, p_h, p_w = self.denoisers[0].config.patch_size
        return f // p_t, h // p_h, w // p_w

    def prepare_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor:
        return noise  # flow matching starts from unit noise (WanPipeline.prepare_latents)

    def expert(self, t: torch.Tensor) -> int:
        """Wan 2.2 A14B: the high-noise expert for t >= boundary, the low-noise one below (WanPipeline)."""
        ratio = self.pipe.config.boundary_ratio
        if ratio is None or len(self.denoisers) == 1 or t >= ratio * self.pipe.scheduler.config.num_train_timesteps:
            return 0
        return 1

    def predict(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, expert: int = 0) -> torch.Tensor:
        """Unguided flow prediction of denoiser ``expert`` for latents ``x`` (B, C, F', H', W') at timestep ``t``."""
        model = self.denoisers[expert]
        # the patch embedding's dtype is the input's (ModelMixin.dtype walks every submodule: ~0.1 ms a call); fp8
        # layerwise casting leaves the patch embedding as loaded (diffusers' skip list for Wan)
        model_in = x.to(model.patch_embedding.weight.dtype)
        if self.pipe.config.expand_timesteps:  # TI2V-5B: one timestep per token
            p_t, p_h, p_w = model.config.patch_size
            tokens = (x.shape[2] // p_t) * (x.shape[3] // p_h) * (x.shape[4] // p_w)
            timestep = t.expand(x.shape[0], tokens)
        else:
            timestep = t.expand(x.shape[0])
        return model(hidden_states=model_in, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    # ---------------------------------------------------------------------------------- VAE streams

    @torch.no_grad()
    def decode_stream(self, latents: torch.Tensor, runtime: RuntimeConfig | None = None) -> Iterator[torch.Tensor]:
        """Frames in [-1, 1], ``(B, 3, f, H, W)`` per latent frame (1 frame, then 4 each).

        Wan's VAE decoder is causal with a per-conv feature cache, so decoding one latent frame at a time
        is bit-exact with ``vae.decode`` (which does the same loop but concatenates everything). The cache is
        this generator's own, so a decode can interleave with an encode (the pixel hand-off between stages).
        """
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.pipe.vae
        z = latents.to(vae_device(vae, self.device), vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        z = z / inv_std + mean  # same op order as WanPipeline for bit-exactness
        ratio = vae.spatial_compression_ratio
        if runtime is not None and runtime.vae_tiling and (z.shape[3] > vae.tile_sample_min_height // ratio or
                                                           z.shape[4] > vae.tile_sample_min_width // ratio):
            yield from decode_tiled(vae, z)  # diffusers' tiling condition (AutoencoderKLWan._decode)
            return
        cache = [None] * vae._cached_conv_counts["decoder"]
        x = vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0], first_chunk=(i == 0))
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            yield out.clamp(-1.0, 1.0)

    @torch.no_grad()
    def encode_stream(self, chunks: Iterable[torch.Tensor], runtime: RuntimeConfig | None = None) -> torch.Tensor:
        """Normalised latents ``(B, C, F', H', W')`` of pixel chunks in [-1, 1] (first chunk 1 frame, then 4 each,
        as ``decode_stream`` yields them), with the posterior mode: ``WanVideoToVideoPipeline``'s encode
        (``vae._encode``'s causal loop) one chunk at a time with this call's own feature cache."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

        vae = self.pipe.vae
        device = vae_device(vae, self.device)
        chunks = iter(chunks)
        first = next(chunks)
        chunks = itertools.chain([first], chunks)
        if runtime is not None and runtime.vae_tiling and (first.shape[3] > vae.tile_sample_min_height or
                                                           first.shape[4] > vae.tile_sample_min_width):
            moments = encode_tiled(vae, chunks, device)  # diffusers' tiling condition (AutoencoderKLWan._encode)
        else:
            cache = [None] * vae._cached_conv_counts["encoder"]
            parts = []
            for chunk in chunks:  # (B, 3, f, H, W)
                x = chunk.to(device, vae.dtype)
                if vae.config.patch_size is not None:
                    x = patchify(x, patch_size=vae.config.patch_size)
                parts.append(vae.encoder(x, feat_cache=cache, feat_idx=[0]))  # (B, 2C, f', h, w)
            moments = vae.quant_conv(torch.cat(parts, dim=2))
        mode = moments[:, : vae.config.z_dim]  # DiagonalGaussianDistribution.mode() = mean
        dtype = torch.float32
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(mode.device, dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(mode.device, dtype)
        return (mode.to(dtype) - mean) * inv_std  # same op order as WanVideoToVideoPipeline.prepare_latents

    # -------------------------------------------------------------------------------- method seams

    @property
    def rope_modules(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self.pipe, name).rope for name in self.denoiser_names
                if getattr(self.pipe, name, None) is not None}

    def install_op(self, site: AttentionSite, op, owner: str):
        if site.kind != "full":
            raise ValueError(f"{site.name}: attention ops patch Wan's 3D self-attention (kind 'full') only")
        return self.install_processor(site, WanOpProcessor(site, op, self.rope_modules[site.denoiser]), owner)

    def _find_sites(self) -> list[AttentionSite]:
        sites = []
        for name in self.denoiser_names:
            model = getattr(self.pipe, name, None)
            if model is None:
                continue
            for i, block in enumerate(model.blocks):
                for attn_name, kind in (("attn1", "full"), ("attn2", "cross")):
                    sites.append(AttentionSite(name=f"{name}.blocks.{i}.{attn_name}", module=getattr(block, attn_name),
                                               kind=kind, level=0, denoiser=name, layer=i, block=block))
        return sites

    def _install_layout_hooks(self) -> None:
        for name in self.denoiser_names:
            model = getattr(self.pipe, name, None)
            if model is None:
                continue
            sites = [s for s in self._sites if s.denoiser == name]
            p_t, p_h, p_w = model.config.patch_size

            def record(module, args, kwargs, sites=sites, p=(p_t, p_h, p_w)):
                x = kwargs.get("hidden_states", args[0] if args else None)  # (B, C, F, H, W)
                layout = TokenLayout("full", x.shape[0], x.shape[2] // p[0], x.shape[3] // p[1], x.shape[4] // p[2])
                for site in sites:
                    site.layout = layout

            self._add_hook(model, "longvid.layout", record)
