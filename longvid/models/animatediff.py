"""AnimateDiff: a Stable Diffusion 1.5 UNet + MotionAdapter (diffusers ``AnimateDiffPipeline`` components).

Temporal attention lives in the motion modules (``AnimateDiffTransformer3D``): each flattens the video to
``(B*H*W, F, C)`` and runs two self-attentions over frames with an absolute sinusoidal positional table of
``motion_max_seq_length`` (32) entries. The denoising maths mirrors diffusers==0.42.1
``AnimateDiffPipeline.__call__`` (batched CFG, ``scale_model_input``, DDIM eta/generator), so vanilla
generation equals the pipeline's output.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch

from longvid.core.context import AttentionSite, TokenLayout
from longvid.core.hooks import replace_forward
from longvid.core.processors import OpAttnProcessor
from longvid.errors import ModelLoadError, Problem, RecipeError
from longvid.models.base import Conditioning, ModelAdapter, from_pretrained
from longvid.models.specs import ANIMATEDIFF


class AnimateDiffAdapter(ModelAdapter):
    spec = ANIMATEDIFF
    pipeline_class = "AnimateDiffPipeline"
    denoiser_names = ("unet",)
    op_processor = OpAttnProcessor

    @classmethod
    def _extra_components(cls, model, dtypes) -> dict[str, Any]:
        if not model.motion_adapter:
            return {}
        from diffusers import MotionAdapter

        adapter = from_pretrained(MotionAdapter, model.motion_adapter, key="model.motion_adapter",
                                  dtype=dtypes["unet"], revision=model.revision,
                                  local_files_only=model.local_files_only)
        return {"motion_adapter": adapter}

    @property
    def max_frames(self) -> int:
        """Length of the motion modules' positional table: the longest sequence vanilla attention accepts."""
        return min(s.pos_embed.pe.shape[1] for s in self.attention_sites("temporal") if s.pos_embed is not None)

    def check_loaded(self) -> None:
        from longvid import registry

        if getattr(self.pipe, "motion_adapter", None) is None:
            # diffusers would fill the motion modules with random weights: the video would be garbage.
            raise ModelLoadError(f"model.motion_adapter: '{self.recipe.model.path}' has no motion adapter; set "
                                 "model.motion_adapter (e.g. guoyww/animatediff-motion-adapter-v1-5-2)")
        frames = self.recipe.video.num_frames
        long_methods = [m for m in self.recipe.methods if registry.method_class(m).long_video]
        if frames > self.max_frames and not long_methods:
            raise RecipeError([Problem("video.num_frames", f"{frames} frames exceed this motion adapter's limit of "
                                                           f"{self.max_frames}; add a long-video method "
                                                           "(see `longvid methods`)")])

    # ------------------------------------------------------------------------------- conditioning

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.pipe.text_encoder.dtype  # AnimateDiffPipeline draws latents in the prompt-embedding dtype

    def encode(self, prompt: str, negative: str) -> Conditioning:
        pos, neg = self.pipe.encode_prompt(prompt, self.device, 1, self.do_cfg, negative)
        return Conditioning(pos, neg if self.do_cfg else None)

    # ---------------------------------------------------------------------------------- denoising

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        s = self.pipe.vae_scale_factor
        return (1, self.pipe.unet.config.in_channels, num_frames, height // s, width // s)

    def prepare_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor:
        return noise * scheduler.init_noise_sigma

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Guided noise prediction for latents ``x`` (B, C, F, H, W); CFG batched as the pipeline does."""
        frames = x.shape[2]
        embeds = torch.cat([cond.negative, cond.positive]) if self.do_cfg else cond.positive  # (2 or 2F, seq, D)
        if cond.positive.shape[0] == 1:  # one embedding per video -> one per frame, (b, f) order as the UNet wants
            embeds = embeds.repeat_interleave(frames, dim=0)
        model_in = torch.cat([x] * 2) if self.do_cfg else x
        pred = self.pipe.unet(model_in, t, encoder_hidden_states=embeds).sample
        if self.do_cfg:
            uncond, text = pred.chunk(2)
            pred = uncond + self.guidance * (text - uncond)
        return pred

    # ------------------------------------------------------------------------------------- decode

    @torch.no_grad()
    def decode_stream(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Frames in [-1, 1], ``(B, 3, f, H, W)`` per ``runtime.decode_chunk`` frames (the SD VAE is per-frame)."""
        vae = self.pipe.vae
        z = 1 / vae.config.scaling_factor * latents.to(vae.device)  # same op as AnimateDiffPipeline.decode_latents
        b, c, f, h, w = z.shape
        z = z.permute(0, 2, 1, 3, 4)  # (B, F, C, h, w)
        chunk = self.recipe.runtime.decode_chunk
        for start in range(0, f, chunk):
            part = z[:, start:start + chunk].reshape(-1, c, h, w).to(vae.dtype)  # (B*f, C, h, w)
            frames = vae.decode(part).sample.float()  # (B*f, 3, H, W)
            yield frames.reshape(b, -1, *frames.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 3, f, H, W)

    # -------------------------------------------------------------------------------- method seams

    def _unet_modules(self, attr: str) -> Iterator[tuple[str, int, str, torch.nn.Module]]:
        """(name, level, part, module) of every module in the UNet blocks' ``attr`` list (``motion_modules`` or
        ``attentions``); level 0 = full latent resolution."""
        unet = self.pipe.unet
        depth = len(unet.down_blocks)
        parts = [(f"down_blocks.{i}", b, i, "encoder") for i, b in enumerate(unet.down_blocks)]
        parts += [("mid_block", unet.mid_block, depth - 1, "middle")]
        parts += [(f"up_blocks.{i}", b, depth - 1 - i, "decoder") for i, b in enumerate(unet.up_blocks)]
        for where, block, level, part in parts:
            prefix = f"unet.{where}"
            for j, module in enumerate(getattr(block, attr, None) or []):
                yield f"{prefix}.{attr}.{j}", level, part, module

    def _find_sites(self) -> list[AttentionSite]:
        sites = []
        for name, level, part, mm in self._unet_modules("motion_modules"):
            for b, block in enumerate(mm.transformer_blocks):
                for attn_name in ("attn1", "attn2"):
                    attn = getattr(block, attn_name, None)
                    if attn is None or attn.is_cross_attention:
                        continue
                    sites.append(AttentionSite(name=f"{name}.transformer_blocks.{b}.{attn_name}", module=attn,
                                               kind="temporal", level=level, part=part, index=len(sites),
                                               block=block, pos_embed=getattr(block, "pos_embed", None)))
        for name, level, part, transformer in self._unet_modules("attentions"):
            for b, block in enumerate(transformer.transformer_blocks):
                for attn_name, kind in (("attn1", "spatial"), ("attn2", "cross")):
                    attn = getattr(block, attn_name, None)
                    if attn is None or attn.is_cross_attention != (kind == "cross"):
                        continue
                    sites.append(AttentionSite(name=f"{name}.transformer_blocks.{b}.{attn_name}", module=attn,
                                               kind=kind, level=level, part=part, index=len(sites), block=block))
        return sites

    def _install_layout_hooks(self) -> None:
        """Temporal sites learn (B, F, H, W) from their motion module's input and ``num_frames``; spatial
        sites learn H, W from their 2D transformer's input and (B, F) from the UNet's 5-D sample."""
        video = {}  # batch and frames of the current UNet call

        def record_video(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]  # (B, C, F, H, W)
            video.update(batch=sample.shape[0], frames=sample.shape[2])

        self._hooks.append(self.pipe.unet.register_forward_pre_hook(record_video, with_kwargs=True))
        for attr, kind in (("motion_modules", "temporal"), ("attentions", "spatial")):
            for name, _, _, module in self._unet_modules(attr):
                sites = [s for s in self._sites if s.name.startswith(f"{name}.") and s.kind == kind]

                def record(module, args, kwargs, sites=sites, kind=kind):
                    x = args[0] if args else kwargs["hidden_states"]  # (B*F, C, H, W)
                    if kind == "temporal":  # the mid block passes num_frames positionally (diffusers 0.42.1)
                        frames = kwargs.get("num_frames", args[4] if len(args) > 4 else None)
                    else:
                        frames = video.get("frames")
                    frames = frames or x.shape[0]
                    layout = TokenLayout(kind, x.shape[0] // frames, frames, x.shape[2], x.shape[3])
                    for site in sites:
                        site.layout = layout

                self._hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))

    @contextlib.contextmanager
    def prepared(self, num_frames: int) -> Iterator[None]:
        """Beyond the positional table (F > 32), extend it with the same sinusoid formula (extrapolation)."""
        undo = []
        if num_frames > self.max_frames:
            for pe_module in {id(s.pos_embed): s.pos_embed for s in self.attention_sites("temporal")}.values():
                undo.append(replace_forward(pe_module, "longvid.positions.extend", _extended_sinusoid))
        try:
            yield
        finally:
            for u in reversed(undo):
                u()


def _extended_sinusoid(module: torch.nn.Module, forward, x: torch.Tensor) -> torch.Tensor:
    """``x + pe[:S]`` for any S: the module's own table, continued with its formula (diffusers
    ``SinusoidalPositionalEmbedding``: sin on even, cos on odd channels, base 10000)."""
    seq, dim = x.shape[1], x.shape[2]
    table = module.pe[0]  # (max_len, C)
    if seq > table.shape[0]:
        pos = torch.arange(table.shape[0], seq, device=x.device, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
        extra = torch.zeros(seq - table.shape[0], dim, device=x.device)
        extra[:, 0::2], extra[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        table = torch.cat([table, extra.to(table.dtype)])
    return x + table[:seq].unsqueeze(0)
