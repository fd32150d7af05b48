"""The SD3-initialised Pyramid Flow DiT: diffusers' ``SD3Transformer2DModel`` blocks with Pyramid Flow's forward
(notes §2.3, §2.5).

The released ``diffusion_transformer_*`` weights of ``rain1011/pyramid-flow-sd3`` are an ``SD3Transformer2DModel``
(24 layers, 24 heads × 64, caption dim 1536, pooled 2048, pos-embed grid 192, RMS qk-norm) whose text-side qk
norms are named ``norm_add_{q,k}`` (diffusers: ``norm_added_{q,k}``) and use eps 1e-5 (diffusers: 1e-6):
:func:`remap_keys` and :func:`build_sd3` take care of both. The forward differs from SD3's:

- every clip goes through the conv patch embedding separately; the current clip gets the centre crop of the
  checkpoint's 2-D sincos table, lower-resolution history clips that crop bilinearly resized to their grid;
- the text sequence is T5 only (masked); text and vision are joined ``[text; vision]``, q and k rotated by a 1-D
  RoPE of the frame index τ over the whole head (θ = 1e4, interleaved pairs; text τ = 0), and attention uses the
  block-causal mask of ``sequence.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longvid.models.pyramid_flow.attention import BlockCausal, block_causal, block_causal_attention
from longvid.models.pyramid_flow.sequence import frame_index, stage_mask, unpack

#: ``SD3Transformer2DModel`` config of the released SD3 Pyramid Flow checkpoints.
SD3_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
QK_EPS = 1e-5


def remap_keys(state: dict) -> dict:
    """Released key names -> diffusers' (``attn.norm_add_q`` -> ``attn.norm_added_q``, likewise k)."""
    return {k.replace(".attn.norm_add_q.", ".attn.norm_added_q.").replace(".attn.norm_add_k.", ".attn.norm_added_k."): v
            for k, v in state.items()}


def build_sd3(**overrides):
    """An ``SD3Transformer2DModel`` of the released config (``overrides`` for tiny tests) with Pyramid Flow's
    qk-norm eps and its attention processor on every block."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**{**SD3_CONFIG, **overrides})
    prepare_sd3(model)
    return model


def prepare_sd3(model) -> None:
    """Set the qk RMSNorm eps to 1e-5 and install :class:`PyramidJointProcessor` (a model loaded with
    ``from_pretrained`` needs this too)."""
    for block in model.transformer_blocks:
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            norm = getattr(block.attn, name, None)
            if norm is not None:
                norm.eps = QK_EPS
        block.attn.set_processor(PyramidJointProcessor())


class PyramidJointProcessor:
    """SD3 joint attention with the text first, a temporal RoPE and a mask (the official kernel is SDPA with a
    boolean mask, scale 1/√64)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None):
        from diffusers.models.embeddings import apply_rotary_emb

        b, n, _ = hidden_states.shape  # vision (B, N, D); text (B, L, D)
        heads = attn.heads

        def split(x):  # (B, S, D) -> (B, heads, S, d)
            return x.unflatten(-1, (heads, -1)).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        tq, tk = split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
        tv = split(attn.add_v_proj(encoder_hidden_states))
        tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        length = encoder_hidden_states.shape[1]
        q, k, v = torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, v], 2)  # [text; vision]
        if rotary is not None:
            q, k = apply_rotary_emb(q, rotary), apply_rotary_emb(k, rotary)
        if isinstance(attention_mask, BlockCausal):  # only the blocks the mask keeps
            out = block_causal_attention(q, k, v, attention_mask)  # (B, heads, L + N, d)
        else:  # the dense boolean mask: the official kernel, kept as the reference
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        text, vision = out[:, :length], out[:, length:]
        vision = attn.to_out[1](attn.to_out[0](vision))
        if attn.context_pre_only:
            return vision, None
        return vision, attn.to_add_out(text)


def _embed(model, clips: list[torch.Tensor]) -> torch.Tensor:
    """Patch-embedded tokens of every clip plus their 2-D positions, ``(B, N, D)``."""
    pe = model.pos_embed
    cur_h, cur_w = clips[-1].shape[3], clips[-1].shape[4]
    table = pe.cropped_pos_embed(cur_h, cur_w)  # (1, h·w, D) for the current clip's token grid
    rows, cols = cur_h // pe.patch_size, cur_w // pe.patch_size
    tokens = []
    for clip in clips:
        b, c, t, h, w = clip.shape
        x = pe.proj(clip.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).to(pe.proj.weight.dtype))  # (B·t, D, h/2, w/2)
        x = x.flatten(2).transpose(1, 2)  # (B·t, h/2·w/2, D)
        pos = table
        if (h // pe.patch_size, w // pe.patch_size) != (rows, cols):  # history at a lower resolution
            grid = table.reshape(1, rows, cols, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(grid, size=(h // pe.patch_size, w // pe.patch_size), mode="bilinear",
                                align_corners=False).flatten(2).transpose(1, 2)
        tokens.append((x + pos.to(x.dtype)).reshape(b, -1, x.shape[-1]))
    return torch.cat(tokens, 1)


def sd3_forward(model, clips: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor, pooled: torch.Tensor,
                timestep: torch.Tensor, dense_mask: bool = False) -> torch.Tensor:
    """Velocity of the current clip ``clips[-1]`` (B, 16, t, h, w) given the history ``clips[:-1]``, T5 states
    ``text`` (B, L, 4096) with ``text_mask``, the CLIP-L + CLIP-G pooled vector (B, 2048) and the global
    ``timestep`` (B,) on the 0–1000 scale. ``dense_mask``: the official dense-mask SDPA (the reference) instead of
    :func:`attention.block_causal_attention`."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    dtype = model.pos_embed.proj.weight.dtype
    hidden = _embed(model, clips)  # (B, N, D)
    temb = model.time_text_embed(timestep.to(dtype), pooled.to(dtype))
    context = model.context_embedder(text.to(dtype))
    tau = torch.cat([torch.zeros(text.shape[1], dtype=torch.int64), frame_index(clips)])
    head_dim = model.config.attention_head_dim
    cos, sin = get_1d_rotary_pos_embed(head_dim, tau.double(), theta=10000.0, use_real=True,
                                       repeat_interleave_real=True)
    mask = (stage_mask(text_mask, clips, hidden.device) if dense_mask else
            block_causal(text_mask, clips, hidden.device))
    kwargs = {"attention_mask": mask,
              "rotary": (cos.to(hidden.device, hidden.dtype), sin.to(hidden.device, hidden.dtype))}
    for block in model.transformer_blocks:
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                joint_attention_kwargs=kwargs)
    out = model.proj_out(model.norm_out(hidden, temb))  # (B, N, 64), (p1 p2 c)
    current = clips[-1]
    n_cur = current.shape[2] * (current.shape[3] // 2) * (current.shape[4] // 2)
    return unpack(out[:, -n_cur:], tuple(current.shape))
