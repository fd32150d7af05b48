"""Tiny random-weight models, built in code with no network: ``model.path: tiny:<variant>``.

They keep the real architectures and compression ratios (Wan's causal 4x8 VAE and 3D RoPE, AnimateDiff's
UNet + MotionAdapter) at toy widths, so every code path of longvid runs in seconds on a CPU: the built-in
``demo`` recipe, and the test suite (which also saves them with ``save_pretrained`` and loads them back
through the same ``from_pretrained`` path a real checkpoint takes). Their output is noise: the weights are
random. Tokenizers are built from in-memory vocabularies (transformers >= 5 accepts them directly).
"""

from __future__ import annotations

import string

import torch

TINY_SEED = 0
_CHARS = list(string.ascii_letters + string.digits + ".,!?'-")

#: tiny variant -> builder (the family of each is ``specs.TINY_VARIANTS``)
VARIANTS = {"wan": "tiny_wan", "wan2.2-a14b": "tiny_wan22_moe", "wan2.2-ti2v": "tiny_wan22_ti2v",
            "animatediff": "tiny_animatediff", "pyramid-flow": "tiny_pyramid_flow"}


def build(variant: str, seed: int = TINY_SEED):
    """Build the tiny diffusers pipeline ``variant`` with weights drawn from ``seed`` (global RNG untouched)."""
    if variant not in VARIANTS:
        raise KeyError(variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return globals()[VARIANTS[variant]]()


def t5_tokenizer(max_len: int = 512):
    """Unigram tokenizer over letters, digits and punctuation; ids <pad>=0 </s>=1 <unk>=2."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_len)


def clip_tokenizer(max_len: int = 77):
    """Character-level BPE (no merges); bos=0, eos=pad=1."""
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>"] + _CHARS + [c + "</w>" for c in _CHARS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_len)


def _umt5(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0))


def _wan_transformer(channels: int = 16):
    from diffusers import WanTransformer3DModel

    # rope_max_seq_len as in the real models (1024) so long-video tests never run off the RoPE table.
    # head dim 36 splits into a 12-dim temporal RoPE band (6 frequencies, as RIFLEx's Wan preset k = 6 needs)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=36,
                                 in_channels=channels, out_channels=channels, text_dim=32, freq_dim=32, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=1024)


def _wan_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=3.0)


def tiny_wan(**extra):
    """Wan 2.1 T2V at toy width: 2 blocks, 2 heads x 12, causal VAE with the real 4x/8x compression."""
    from diffusers import AutoencoderKLWan, WanPipeline

    tok = t5_tokenizer()
    vae = extra.pop("vae", None) or AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                     temperal_downsample=[False, True, True])
    transformer = extra.pop("transformer", None) or _wan_transformer(vae.config.z_dim)
    return WanPipeline(tokenizer=tok, text_encoder=_umt5(len(tok)), vae=vae, transformer=transformer,
                       scheduler=_wan_scheduler(), **extra)


def tiny_wan22_moe():
    """Wan 2.2 A14B-style: a high-noise and a low-noise expert switched at ``boundary_ratio``."""
    return tiny_wan(transformer=_wan_transformer(), transformer_2=_wan_transformer(), boundary_ratio=0.875)


def tiny_wan22_ti2v():
    """Wan 2.2 TI2V-5B-style: 48-channel residual VAE with 2x2 patchified decode (4x16 compression)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                           out_channels=12, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    return tiny_wan(vae=vae, transformer=_wan_transformer(48), expand_timesteps=True)


def tiny_animatediff():
    """AnimateDiff: SD1.5-shaped UNet (16/32 channels) + MotionAdapter (max 32 frames), SD VAE, CLIP."""
    import diffusers as d
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                                intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                                vocab_size=len(tok), max_position_embeddings=77))
    unet = d.UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=32, in_channels=4,
                                  out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                  norm_num_groups=2, attention_head_dim=8)
    adapter = d.MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_norm_num_groups=2,
                              motion_num_attention_heads=2, motion_max_seq_length=32)
    vae = d.AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3,
                          down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                          latent_channels=4, norm_num_groups=2)
    scheduler = d.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                                steps_offset=1, timestep_spacing="linspace")
    return d.AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, motion_adapter=adapter,
                                 scheduler=scheduler, feature_extractor=None, image_encoder=None)


def tiny_pyramid_flow():
    """Pyramid Flow (miniFLUX): the Flux DiT with 2 + 2 blocks of 2 heads x 64, the causal VAE at widths 8/16,
    CLIP-L (24 wide) and T5 (32 wide) encoders."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from longvid.models.pyramid_flow.adapter import PyramidPipeline
    from longvid.models.pyramid_flow.dit_flux import MINIFLUX_CONFIG
    from longvid.models.pyramid_flow.vae import CausalVideoVAE

    dit = FluxTransformer2DModel(**{**MINIFLUX_CONFIG, "num_layers": 2, "num_single_layers": 2,
                                    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 24})
    vae = CausalVideoVAE(channels=(8, 16, 16, 16), encoder_layers=1, decoder_layers=1, groups=4)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(128)
    clip = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=24,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                                        vocab_size=len(clip_tok), max_position_embeddings=77))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    return PyramidPipeline("miniflux", dit, vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                           tokenizer_2=t5_tok)
