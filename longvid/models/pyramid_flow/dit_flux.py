"""The miniFLUX DiT: diffusers' ``FluxTransformer2DModel`` with Pyramid Flow's forward (notes §2.4–2.5).

The released ``diffusion_transformer_*`` weights load into ``FluxTransformer2DModel(in_channels=64,
num_layers=8, num_single_layers=16, attention_head_dim=64, num_attention_heads=30, joint_attention_dim=4096,
pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 24, 24))`` key for key. Only the forward
differs, so it is written here over the model's own modules: ``(p1 p2 c)`` patches of every clip, (τ, y, x)
positions, the block-causal mask through the attention processors' ``attention_mask`` (its structure, attended
block by block by :class:`PyramidFluxProcessor`), and the timestep on the
0–1000 scale straight into ``time_text_embed`` (diffusers' forward computes ``(t/1000 in the model dtype)·1000``,
which breaks bf16 parity). The output is the current clip's velocity; history tokens are computed and dropped.
"""

from __future__ import annotations

import torch

from longvid.models.pyramid_flow.attention import BlockCausal, block_causal, block_causal_attention
from longvid.models.pyramid_flow.sequence import image_ids, pack, stage_mask, unpack

#: ``FluxTransformer2DModel`` config of the released miniFLUX checkpoints (their config.json says patch 1 and
#: 64 input channels: the 2×2 patch is the forward's, not the model's).
MINIFLUX_CONFIG = dict(patch_size=1, in_channels=64, num_layers=8, num_single_layers=16, attention_head_dim=64,
                       num_attention_heads=30, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=False, axes_dims_rope=(16, 24, 24))


def flux_forward(model, clips: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor,
                 pooled: torch.Tensor, timestep: torch.Tensor, dense_mask: bool = False) -> torch.Tensor:
    """Velocity of the current clip ``clips[-1]`` (B, 16, t, h, w) given the history ``clips[:-1]`` (oldest first),
    T5 states ``text`` (B, L, 4096) with ``text_mask`` (B, L), the CLIP pooled vector (B, 768) and the global
    ``timestep`` (B,) on the 0–1000 scale (already in the model's dtype, as the official pipeline casts it).
    ``dense_mask``: the official dense-mask attention (the reference) instead of
    :func:`attention.block_causal_attention`."""
    prepare_flux(model)
    dtype = model.x_embedder.weight.dtype
    tokens = torch.cat([pack(c) for c in clips], dim=1).to(dtype)  # (B, N, 64)
    hidden = model.x_embedder(tokens)  # (B, N, D)
    temb = model.time_text_embed(timestep.to(dtype), pooled.to(dtype))  # (B, D)
    context = model.context_embedder(text.to(dtype))  # (B, L, D)
    ids = torch.cat([torch.zeros(text.shape[1], 3), image_ids(clips)]).to(hidden.device)  # (L + N, 3)
    rotary = model.pos_embed(ids)
    kwargs = {"attention_mask": stage_mask(text_mask, clips, hidden.device) if dense_mask else
              block_causal(text_mask, clips, hidden.device)}
    for block in model.transformer_blocks:
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                image_rotary_emb=rotary, joint_attention_kwargs=kwargs)
    for block in model.single_transformer_blocks:
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                image_rotary_emb=rotary, joint_attention_kwargs=kwargs)
    out = model.proj_out(model.norm_out(hidden, temb))  # (B, N, 64)
    current = clips[-1]
    n_cur = current.shape[2] * (current.shape[3] // 2) * (current.shape[4] // 2)
    return unpack(out[:, -n_cur:], tuple(current.shape))


def prepare_flux(model) -> None:
    """Install :class:`PyramidFluxProcessor` on every attention of ``model`` (once)."""
    if getattr(model, "_pyramid_processors", False):
        return
    for block in (*model.transformer_blocks, *model.single_transformer_blocks):
        block.attn.set_processor(PyramidFluxProcessor())
    model._pyramid_processors = True


class PyramidFluxProcessor:
    """diffusers' Flux attention (its projections, qk-norms, ``[text; vision]`` join and RoPE) with a
    :class:`BlockCausal` mask attended block by block; a tensor mask goes to diffusers' own processor."""

    def __init__(self):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.dense = FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not isinstance(attention_mask, BlockCausal):
            return self.dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        q, k, v, tq, tk, tv = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)  # (B, S, D) each
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))  # (B, N, H, d)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:  # double blocks: the text stream joins first
            tq, tk, tv = (x.unflatten(-1, (-1, attn.head_dim)) for x in (tq, tk, tv))
            q = torch.cat([attn.norm_added_q(tq), q], dim=1)
            k = torch.cat([attn.norm_added_k(tk), k], dim=1)
            v = torch.cat([tv, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = block_causal_attention(*(x.transpose(1, 2) for x in (q, k, v)), attention_mask)  # (B, H, L, d)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)  # (B, L, H·d)
        if encoder_hidden_states is None:
            return out
        text, vision = out.split_with_sizes([encoder_hidden_states.shape[1],
                                             out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        return attn.to_out[1](attn.to_out[0](vision.contiguous())), attn.to_add_out(text.contiguous())
