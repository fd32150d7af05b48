"""Pyramid Flow (arXiv 2410.05954): autoregressive pyramidal flow matching, written from the notes, on diffusers blocks.

Built so far (each a small module with its tests; the family is not registered until it generates end to end):

- ``scheduler.py``: the pyramid flow-matching schedule (stage tables, stage-local Euler steps, the stage jump's
  renoising with closed-form block noise);
- ``pyramid.py``: the spatial pyramid of a unit's noise, the clean-latent pyramid and the history each stage sees;
- ``sequence.py``: one stage's token sequence: ``(p1 p2 c)`` patches of every clip, (τ, y, x) positions with
  interpolated positions for low-resolution history, and the block-causal mask;
- ``dit_flux.py``: the miniFLUX DiT as diffusers' ``FluxTransformer2DModel`` (the released keys load as they are)
  with Pyramid Flow's own forward;
- ``dit_sd3.py``: the SD3-initialised DiT on diffusers' ``SD3Transformer2DModel`` blocks (key remap, qk eps 1e-5,
  a joint-attention processor with the temporal RoPE and the mask, the pos-embed crop and its resized copies).

- ``vae.py``: the causal video VAE (the released key list exactly), plain and exact chunked decode, encode with a
  seeded posterior sample, the per-frame latent statistics.

- ``loop.py``: the autoregressive generation (t2v and i2v), classifier-free guidance as the official gate,
  per-unit prompts, a seeded RNG plan, resumable at unit boundaries.

- ``text.py``: T5 states (128, masked) and pooled CLIP (L, or L + G) of prompts;
- ``load.py``: an official-layout folder loaded strictly (DiT kind from its keys, VAE sizes from its weights,
  safetensors or ``weights_only`` pickles, transformers text encoders); single-file DiT/VAE (``transformer_file``,
  ``vae_file``: bf16/fp8 safetensors cast at load, DiT sizes from the weights), checked torch-free by
  ``single_file.py``.

Still to build (issue 11): tiled VAE decode, the adapter that runs ``loop.py`` through the
engine's loop seam, hub download, recipes and docs/models/pyramid-flow.md.
"""
