"""``runtime.attention_backend``: diffusers' attention dispatch backend for the attention longvid's methods leave as
it is (Wan). Checked without torch at resolve time against diffusers' own list; a backend that cannot run here is
one line at load; longvid's processors inherit it from the ones they replace."""

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from longvid import runner
from longvid.errors import ModelLoadError, RecipeError
from longvid.recipe.resolve import resolve
from longvid.recipe.validate import ATTENTION_BACKENDS

SMALL = ["video.num_frames=97", "video.height=32", "video.width=48", "sampler.steps=2", "methods.ultravico={}"]


def test_the_known_backends_are_diffusers_own():
    assert ATTENTION_BACKENDS == tuple(b.value for b in AttentionBackendName)


def test_a_backend_reaches_the_vanilla_and_the_methods_processors_and_gives_the_same_video(monkeypatch):
    from diffusers.models.transformers import transformer_wan

    import longvid.models.wan as wan

    seen, inherited = [], []
    real = transformer_wan.dispatch_attention_fn

    def spy(*args, backend=None, **kwargs):  # diffusers' own Wan processor (the attention no method patches)
        seen.append(str(backend))
        return real(*args, backend=backend, **kwargs)

    real_call = wan.WanOpProcessor.__call__

    def op_call(self, *args, **kwargs):  # longvid's processor on the sites a method patches
        inherited.append(str(self._attention_backend))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", spy)
    monkeypatch.setattr(wan.WanOpProcessor, "__call__", op_call)
    short = ["video.num_frames=9", "video.height=32", "video.width=48", "sampler.steps=2"]
    reference = runner.generate(resolve("demo", short), write=False).latents
    seen.clear()
    latents = runner.generate(resolve("demo", [*short, "runtime.attention_backend=_native_math"]), write=False).latents
    assert seen and set(seen) == {"AttentionBackendName._NATIVE_MATH"}
    assert torch.allclose(latents, reference, rtol=1e-4, atol=1e-5)  # another SDPA kernel, the same attention
    runner.generate(resolve("demo", [*SMALL, "runtime.attention_backend=_native_math"]), write=False)
    assert inherited and set(inherited) == {"AttentionBackendName._NATIVE_MATH"}
    # the process-wide default is untouched: a model loaded afterwards without the key runs native attention
    seen.clear()
    assert torch.equal(runner.generate(resolve("demo", short), write=False).latents, reference)
    assert set(seen) == {"None"}


def test_bad_backends_are_one_line():
    with pytest.raises(RecipeError, match="unknown backend 'flsh' \\(did you mean 'flash'"):
        resolve("demo", ["runtime.attention_backend=flsh"])
    with pytest.raises(RecipeError, match="Wan only"):
        resolve("freenoise-animatediff-64", ["runtime.attention_backend=flash"])
    with pytest.raises(ModelLoadError, match="runtime.attention_backend: flash cannot run here .*flash-attn"):
        runner.load_adapter(resolve("demo", ["runtime.attention_backend=flash"]))
