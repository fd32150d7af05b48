"""The diffusers code longvid mirrors is pinned by a hash of its source.

longvid adapts a few upstream functions (processors, the pipelines' loop order, the Wan VAE's causal
encode/decode loops, the v2v start point) and tests its own versions against them where it can. A diffusers
upgrade that changes one of them must fail here, loudly, instead of letting longvid drift: review the longvid
code named next to the function against the new upstream source, then update the hash.
"""

import hashlib
import inspect

import diffusers
import pytest
from diffusers.models.attention import FreeNoiseTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanRotaryPosEmbed
from diffusers.pipelines.wan.pipeline_wan_video2video import WanVideoToVideoPipeline

#: upstream function -> (its source's sha256 prefix at diffusers 0.42.1, the longvid code that mirrors it)
PINNED = {
    WanAttnProcessor.__call__: ("13c09feedcfe814a", "models/wan.py::WanOpProcessor, rotate_pairs"),
    WanRotaryPosEmbed.forward: ("863fb1c601f5756a", "models/wan.py::WanRotary.tables"),
    AttnProcessor2_0.__call__: ("bf23ea5ae4040427", "core/processors.py::OpAttnProcessor"),
    FreeNoiseTransformerBlock.forward: ("d44c35f926e2dff7", "core/block_fusion.py::BlockFusionHook"),
    AutoencoderKLWan._encode: ("22ad02b914e33ca6", "models/wan.py::WanAdapter.encode_stream"),
    AutoencoderKLWan._decode: ("7c6f228efce72e22", "models/wan.py::WanAdapter.decode_stream"),
    WanVideoToVideoPipeline.prepare_latents: ("f2ad17c46bed784f", "core/stages.py::renoise, WanAdapter.encode_stream"),
    WanVideoToVideoPipeline.get_timesteps: ("dde064554a54b0d7", "recipe/stages.py::start_step"),
    diffusers.WanPipeline.__call__: ("8e8f5557ef9294e0", "core/sampler.py::run_stage, core/guidance.py"),
    diffusers.AnimateDiffPipeline.__call__: ("d10ef9f11648c397", "core/sampler.py::run_stage, core/guidance.py"),
}


@pytest.mark.parametrize("function", list(PINNED), ids=lambda f: f.__qualname__)
def test_mirrored_upstream_source_is_unchanged(function):
    expected, ours = PINNED[function]
    actual = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert actual == expected, (f"diffusers {diffusers.__version__} changed {function.__qualname__}: review {ours} "
                                f"against it, then pin {actual}")
