"""Wan 2.1 / 2.2 text-to-video (diffusers ``WanPipeline`` components).

Covers Wan 2.1 T2V (1.3B, 14B), Wan 2.2 A14B (a high-noise ``transformer`` and a low-noise
``transformer_2`` switched at ``boundary_ratio``) and Wan 2.2 TI2V-5B (``expand_timesteps``: one timestep
per token; 48-channel patchified VAE). The denoising maths mirrors diffusers==0.42.1 ``WanPipeline.__call__``
(cond and uncond as two calls, as the pipeline does), so vanilla generation equals the pipeline's output.
"""

from __future__ import annotations

from typing import Iterator

import torch
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from longvid.core.context import AttentionSite, TokenLayout
from longvid.core.processors import AttentionOp
from longvid.models.base import Conditioning, ModelAdapter
from longvid.models.specs import WAN


class WanOpProcessor:
    """Wan self-attention with the attention core replaced by a longvid op.

    Adapted from diffusers==0.42.1 ``transformer_wan.WanAttnProcessor.__call__`` (change: self-attention only;
    ``dispatch_attention_fn`` -> ``op(q, k, v, layout)`` in SDPA layout). tests/models/test_wan.py pins the
    upstream source hash so a diffusers upgrade fails loudly instead of drifting.
    """

    def __init__(self, site: AttentionSite, op: AttentionOp):
        self.site = site
        self.op = op

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.site.name}: longvid attention ops patch self-attention without masks only")
        q, k, v = _get_qkv_projections(attn, hidden_states, None)  # (B, S, heads*D)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # (B, S, heads, D)
        if rotary_emb is not None:
            q, k = apply_rotary(q, *rotary_emb), apply_rotary(k, *rotary_emb)
        out = self.op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.site.layout)  # (B, heads, S, D)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # (B, S, heads*D)
        return attn.to_out[1](attn.to_out[0](out))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair rotary embedding on ``(B, S, heads, D)`` (same op order as diffusers 0.42.1)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanAdapter(ModelAdapter):
    spec = WAN
    op_processor = WanOpProcessor
    pipeline_class = "WanPipeline"
    denoiser_names = ("transformer", "transformer_2")

    # ------------------------------------------------------------------------------- conditioning

    def encode(self, prompt: str, negative: str) -> Conditioning:
        pos, neg = self.pipe.encode_prompt(prompt=prompt, negative_prompt=negative,
                                           do_classifier_free_guidance=self.do_cfg, num_videos_per_prompt=1,
                                           max_sequence_length=self.recipe.sampler.max_sequence_length,
                                           device=self.device)
        return Conditioning(pos.to(self.dtype), neg.to(self.dtype) if neg is not None else None)

    # ---------------------------------------------------------------------------------- denoising

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        vae = self.pipe.vae
        s = self.pipe.vae_scale_factor_spatial
        return (1, vae.config.z_dim, self.latent_frames(num_frames), height // s, width // s)

    def prepare_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor:
        return noise  # flow matching starts from unit noise (WanPipeline.prepare_latents)

    def _expert(self, t: torch.Tensor) -> tuple[torch.nn.Module, float]:
        """Wan 2.2 A14B: the high-noise expert for t >= boundary, the low-noise one below (WanPipeline)."""
        ratio = self.pipe.config.boundary_ratio
        sampler = self.recipe.sampler
        if ratio is None or t >= ratio * self.pipe.scheduler.config.num_train_timesteps:
            return self.denoisers[0], float(sampler.guidance_scale)
        g2 = sampler.guidance_scale_2 if sampler.guidance_scale_2 is not None else sampler.guidance_scale
        return self.pipe.transformer_2, float(g2)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Guided flow prediction for latents ``x`` (B, C, F', H', W') at timestep ``t``."""
        model, guidance = self._expert(t)
        model_in = x.to(model.dtype)
        if self.pipe.config.expand_timesteps:  # TI2V-5B: one timestep per token
            p_t, p_h, p_w = model.config.patch_size
            tokens = (x.shape[2] // p_t) * (x.shape[3] // p_h) * (x.shape[4] // p_w)
            timestep = t.expand(x.shape[0], tokens)
        else:
            timestep = t.expand(x.shape[0])
        pred = model(hidden_states=model_in, timestep=timestep, encoder_hidden_states=cond.positive,
                     return_dict=False)[0]
        if guidance > 1.0 and cond.negative is not None:
            uncond = model(hidden_states=model_in, timestep=timestep, encoder_hidden_states=cond.negative,
                           return_dict=False)[0]
            pred = uncond + guidance * (pred - uncond)
        return pred

    # ------------------------------------------------------------------------------------- decode

    @torch.no_grad()
    def decode_stream(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Frames in [-1, 1], ``(B, 3, f, H, W)`` per latent frame (1 frame, then 4 each).

        Wan's VAE decoder is causal with a per-conv feature cache, so decoding one latent frame at a time
        is bit-exact with ``vae.decode`` (which does the same loop but concatenates everything).
        """
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.pipe.vae
        z = latents.to(vae.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        z = z / inv_std + mean  # same op order as WanPipeline for bit-exactness
        vae.clear_cache()
        try:
            x = vae.post_quant_conv(z)
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=(i == 0))
                if vae.config.patch_size is not None:
                    out = unpatchify(out, patch_size=vae.config.patch_size)
                yield out.clamp(-1.0, 1.0)
        finally:
            vae.clear_cache()

    # -------------------------------------------------------------------------------- method seams

    @property
    def rope_module(self) -> torch.nn.Module | None:
        return self.denoisers[0].rope

    def _find_sites(self) -> list[AttentionSite]:
        sites = []
        for name in self.denoiser_names:
            model = getattr(self.pipe, name, None)
            if model is None:
                continue
            for i, block in enumerate(model.blocks):
                sites.append(AttentionSite(name=f"{name}.blocks.{i}.attn1", module=block.attn1, kind="full",
                                           level=0, index=i, block=block))
        return sites

    def _install_layout_hooks(self) -> None:
        for name in self.denoiser_names:
            model = getattr(self.pipe, name, None)
            if model is None:
                continue
            sites = [s for s in self._sites if s.name.startswith(f"{name}.")]
            p_t, p_h, p_w = model.config.patch_size

            def record(module, args, kwargs, sites=sites, p=(p_t, p_h, p_w)):
                x = kwargs.get("hidden_states", args[0] if args else None)  # (B, C, F, H, W)
                layout = TokenLayout("full", x.shape[0], x.shape[2] // p[0], x.shape[3] // p[1], x.shape[4] // p[2])
                for site in sites:
                    site.layout = layout

            self._hooks.append(model.register_forward_pre_hook(record, with_kwargs=True))
