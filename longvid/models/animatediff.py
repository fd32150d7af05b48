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
from typing import Any, Iterable, Iterator

import torch

from longvid.core.context import AttentionSite, TokenLayout
from longvid.core.hooks import replace_forward
from longvid.core.processors import OpAttnProcessor
from longvid.errors import ModelLoadError, Problem, RecipeError
from longvid.models.base import Conditioning, ModelAdapter, from_pretrained, uses_cfg, vae_device
from longvid.models.specs import ANIMATEDIFF
from longvid.recipe.schema import Recipe, RuntimeConfig, SamplerConfig


class AnimateDiffAdapter(ModelAdapter):
    spec = ANIMATEDIFF
    pipeline_class = "AnimateDiffPipeline"
    denoiser_names = ("unet",)
    op_processor = OpAttnProcessor
    batched_cfg = True  # AnimateDiffPipeline runs [uncond, cond] as one batch

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
        if getattr(self.pipe, "motion_adapter", None) is None:
            # diffusers would fill the motion modules with random weights: the video would be garbage.
            raise ModelLoadError(f"model.motion_adapter: '{self.load_key['model.path']}' has no motion adapter; set "
                                 "model.motion_adapter (e.g. guoyww/animatediff-motion-adapter-v1-5-2)")

    def check_run(self, recipe: Recipe) -> None:
        from longvid import registry
        from longvid.recipe.stages import plan_stages

        super().check_run(recipe)
        for plan in plan_stages(recipe):  # the loaded table may be shorter than the family's usual 32
            long_methods = [m for m in plan.methods if registry.method_class(m).long_video]
            if plan.num_frames > self.max_frames and not long_methods:
                raise RecipeError([Problem("video.num_frames", f"{plan.num_frames} frames exceed this motion "
                                                               f"adapter's limit of {self.max_frames}; add a long-video "
                                                               "method (see `longvid methods`)")])

    # ------------------------------------------------------------------------------- conditioning

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.pipe.text_encoder.dtype  # AnimateDiffPipeline draws latents in the prompt-embedding dtype

    def encode(self, prompt: str, negative: str, sampler: SamplerConfig) -> Conditioning:
        cfg = uses_cfg(sampler)
        pos, neg = self.pipe.encode_prompt(prompt, self.device, 1, cfg, negative)
        return Conditioning(pos, neg if cfg else None)

    # ---------------------------------------------------------------------------------- denoising

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        s = self.pipe.vae_scale_factor
        return (1, self.pipe.unet.config.in_channels, num_frames, height // s, width // s)

    def prepare_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor:
        return noise * scheduler.init_noise_sigma

    def predict(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, expert: int = 0) -> torch.Tensor:
        """Unguided noise prediction for latents ``x`` (B, C, F, H, W); ``embeds`` is one prompt embedding per
        video ``(B, seq, D)`` or per frame ``(B*F, seq, D)``, (b, f) order as the UNet wants."""
        frames = x.shape[2]
        if embeds.shape[0] == x.shape[0]:  # one embedding per video -> one per frame
            embeds = embeds.repeat_interleave(frames, dim=0)
        unet = self.pipe.unet
        # a refine stage hands float32 latents to an fp16 UNet (a no-op else); with fp8 storage the compute dtype
        x = x.to(self.compute_dtypes.get("unet") or unet.conv_in.weight.dtype)
        return unet(x, t, encoder_hidden_states=embeds).sample

    # ---------------------------------------------------------------------------------- VAE streams

    @torch.no_grad()
    def decode_stream(self, latents: torch.Tensor, runtime: RuntimeConfig | None = None) -> Iterator[torch.Tensor]:
        """Frames in [-1, 1], ``(B, 3, f, H, W)`` per ``runtime.decode_chunk`` frames (the SD VAE is per-frame)."""
        vae = self.pipe.vae
        z = 1 / vae.config.scaling_factor * latents.to(vae_device(vae, self.device))  # as AnimateDiffPipeline
        b, c, f, h, w = z.shape
        z = z.permute(0, 2, 1, 3, 4)  # (B, F, C, h, w)
        chunk = runtime.decode_chunk if runtime is not None else 16
        for start in range(0, f, chunk):
            part = z[:, start:start + chunk].reshape(-1, c, h, w).to(vae.dtype)  # (B*f, C, h, w)
            with _tiling(vae, runtime):
                frames = vae.decode(part).sample.float()  # (B*f, 3, H, W)
            yield frames.reshape(b, -1, *frames.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 3, f, H, W)

    @torch.no_grad()
    def encode_stream(self, chunks: Iterable[torch.Tensor], runtime: RuntimeConfig | None = None) -> torch.Tensor:
        """Latents ``(B, C, F, h, w)`` of pixel chunks ``(B, 3, f, H, W)`` in [-1, 1]: the posterior mode times the
        VAE's scaling factor, frame by frame (the SD VAE has no temporal context)."""
        vae = self.pipe.vae
        parts = []
        for chunk in chunks:
            b, _, f, hh, ww = chunk.shape
            frames = chunk.permute(0, 2, 1, 3, 4).reshape(b * f, 3, hh, ww).to(vae_device(vae, self.device), vae.dtype)
            with _tiling(vae, runtime):
                z = vae.encode(frames).latent_dist.mode() * vae.config.scaling_factor  # (B*f, C, h, w)
            parts.append(z.float().reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4))  # (B, C, f, h, w)
        return torch.cat(parts, dim=2)

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
        sites: list[AttentionSite] = []
        layer = {"temporal": 0, "spatial": 0, "cross": 0}  # per-kind layer counters (one denoiser: the UNet)

        def add(name, module, kind, **extra):
            sites.append(AttentionSite(name=name, module=module, kind=kind, denoiser="unet", layer=layer[kind],
                                       **extra))
            layer[kind] += 1

        for name, level, part, mm in self._unet_modules("motion_modules"):
            for b, block in enumerate(mm.transformer_blocks):
                for attn_name in ("attn1", "attn2"):
                    attn = getattr(block, attn_name, None)
                    if attn is None or attn.is_cross_attention:
                        continue
                    add(f"{name}.transformer_blocks.{b}.{attn_name}", attn, "temporal", level=level, part=part,
                        block=block, pos_embed=getattr(block, "pos_embed", None))
        for name, level, part, transformer in self._unet_modules("attentions"):
            for b, block in enumerate(transformer.transformer_blocks):
                for attn_name, kind in (("attn1", "spatial"), ("attn2", "cross")):
                    attn = getattr(block, attn_name, None)
                    if attn is None or attn.is_cross_attention != (kind == "cross"):
                        continue
                    add(f"{name}.transformer_blocks.{b}.{attn_name}", attn, kind, level=level, part=part, block=block)
        return sites

    def _install_layout_hooks(self) -> None:
        """Temporal sites learn (B, F, H, W) from their motion module's input and ``num_frames``; spatial
        sites learn H, W from their 2D transformer's input and (B, F) from the UNet's 5-D sample."""
        video = {}  # batch and frames of the current UNet call

        def record_video(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]  # (B, C, F, H, W)
            video.update(batch=sample.shape[0], frames=sample.shape[2])

        self._add_hook(self.pipe.unet, "longvid.layout", record_video)
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

                self._add_hook(module, "longvid.layout", record)

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


@contextlib.contextmanager
def _tiling(vae, runtime: RuntimeConfig | None) -> Iterator[None]:
    """diffusers' own spatial tiling of the SD VAE for one call when ``runtime.vae_tiling`` (restored after)."""
    before = vae.use_tiling
    vae.use_tiling = bool(runtime is not None and runtime.vae_tiling)
    try:
        yield
    finally:
        vae.use_tiling = before
