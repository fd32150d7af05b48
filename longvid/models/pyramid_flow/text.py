"""Pyramid Flow's text conditioning (notes §4): T5-XXL states (128 tokens, masked) plus a pooled CLIP vector.

miniFLUX pools CLIP-L (``pooler_output``, 768); the SD3 variant concatenates CLIP-L's and CLIP-G's projected
``text_embeds`` (768 + 1280 = 2048). CLIP runs on 77 padded tokens without an attention mask; only T5's states
enter the token sequence. The official pipeline appends a quality suffix to every prompt and has a default
negative prompt; both are kept as its defaults (``PROMPT_SUFFIX``, ``NEGATIVE_PROMPT``).
"""

from __future__ import annotations

import torch

from longvid.models.pyramid_flow.loop import TextCondition

PROMPT_SUFFIX = ", hyper quality, Ultra HD, 8K"
NEGATIVE_PROMPT = ("cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, "
                   "extra limbs, extra digits, misplaced objects, mutated anatomy, monochrome, horror")
T5_TOKENS = 128


def text_components(components: dict) -> tuple[list[tuple], tuple]:
    """``([(clip tokenizer, clip encoder), …], (t5 tokenizer, t5 encoder))`` of an official-layout component dict
    (``tokenizer``/``text_encoder``, ``_2``, ``_3``), told apart by their configs."""
    clips, t5 = [], None
    for suffix in ("", "_2", "_3"):
        encoder = components.get(f"text_encoder{suffix}")
        if encoder is None:
            continue
        pair = (components[f"tokenizer{suffix}"], encoder)
        if encoder.config.model_type in ("t5", "umt5"):
            t5 = pair
        else:
            clips.append(pair)
    if t5 is None or not clips:
        raise ValueError("Pyramid Flow needs a T5 encoder and at least one CLIP encoder")
    return clips, t5


@torch.no_grad()
def encode(components: dict, prompts: list[str], device: torch.device) -> TextCondition:
    """T5 states ``(B, 128, D)``, their mask ``(B, 128)`` and the pooled CLIP vector ``(B, P)`` of ``prompts``."""
    clips, (t5_tok, t5) = text_components(components)
    pooled = []
    for tokenizer, encoder in clips:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids)
        pooled.append(out.text_embeds if hasattr(out, "text_embeds") and out.text_embeds is not None
                      else out.pooler_output)
    tokens = t5_tok(prompts, padding="max_length", max_length=T5_TOKENS, truncation=True, return_attention_mask=True,
                    return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    states = t5(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    return TextCondition(states, mask, torch.cat(pooled, dim=-1))
