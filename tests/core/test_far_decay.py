"""UltraViCo's far-pair logit decay: geometry (the notes' shares), kernels against a dense float64 reference."""

import pytest
import torch

from longvid.core.far_decay import far_decay_attention, far_decay_reference, far_mask, far_share, first_frame_mask


@pytest.mark.parametrize("latent_frames, share", [(21, 0.2500), (42, 0.5625), (84, 0.7656)])
def test_far_pair_shares_at_wan_480p(latent_frames, share):
    """Notes (ultravico-riflex.md §3): far-pair share with the token rule, F = 1560, N = 21."""
    assert round(far_share(latent_frames * 1560, 1560, 21), 4) == share


@pytest.mark.parametrize("dt, share", [(9, 0.0), (10, 0.125), (11, 0.875), (12, 1.0)])
def test_far_share_per_frame_distance_is_token_based(dt, share):
    """Frame distance 10 is 12.5 % far and 11 is 87.5 % (the notes' Monte Carlo: 0.124983, 0.874926)."""
    f = 1560
    i = torch.arange(f)
    far = far_mask(i[:, None], dt * f + i[None, :], f, 21)  # query in frame 0, key in frame dt
    assert abs(far.double().mean().item() - share) < 1e-3


def test_first_frame_rule_official_off_by_ones():
    f, n = 4, 3
    m = torch.arange(3 * f + 2)
    hidden = first_frame_mask(m[:, None], m[None, :], f, n, "official")
    exact = first_frame_mask(m[:, None], m[None, :], f, n, "exact")
    assert hidden[f, n * f + 1] and not exact[f, n * f + 1]  # official: the first token of frame 1 counts as frame 0
    assert exact[0, n * f] and not hidden[0, n * f]  # official: the first token of frame N is missed


def _qkv(b=1, h=2, frames=10, f=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, frames * f, d, generator=g) for _ in range(3))
    return q, k + 0.7, v  # a K offset, so centring matters


@pytest.mark.parametrize("rule", ["token", "frame"])
@pytest.mark.parametrize("first_frame", ["official", "exact", "off"])
@pytest.mark.parametrize("center_k", [True, False])
def test_chunked_equals_dense_reference(rule, first_frame, center_k):
    q, k, v = _qkv()
    kw = dict(tokens_per_frame=6, train_frames=4, alpha=0.9, rule=rule, first_frame=first_frame, center_k=center_k)
    ref = far_decay_reference(q, k, v, **kw)
    ours = far_decay_attention(q, k, v, backend="chunked", chunk_bytes=2 * 2 * 60 * 4 * 7, **kw)  # 7-row chunks
    assert (ours.double() - ref).abs().max() <= 2e-6


@pytest.mark.parametrize("rule", ["token", "frame"])
@pytest.mark.parametrize("first_frame", ["official", "exact", "off"])
@pytest.mark.parametrize("alpha", [0.9, 0.3, 1.0])
@pytest.mark.parametrize("frames, f, n, rows", [
    (10, 6, 4, 16),   # blocks narrower than the near window: always-far, mixed and near key regions
    (12, 5, 3, 40),   # blocks wider than the window: the two mixed slabs meet
    (4, 6, 8, 16),    # shorter than the training length: no always-far region, first-frame rule inactive
    (30, 6, 4, 1),    # below the 16-row floor: 16-row blocks
])
def test_regions_equal_dense_reference(rule, first_frame, alpha, frames, f, n, rows):
    """The CPU path (a GEMM per key region, the rule folded into the far GEMM) against the float64 reference."""
    q, k, v = _qkv(frames=frames, f=f, seed=frames)
    kw = dict(tokens_per_frame=f, train_frames=n, alpha=alpha, rule=rule, first_frame=first_frame)
    ref = far_decay_reference(q, k, v, **kw)
    ours = far_decay_attention(q, k, v, backend="regions", chunk_bytes=rows * frames * f * 4 * 2, **kw)
    assert ours.dtype == q.dtype
    assert (ours.double() - ref).abs().max() <= 2e-6


def test_auto_backend_keeps_gradients_on_cpu():
    """Under autograd the CPU path is the differentiable chunked one (the regions path writes in place)."""
    q, k, v = (t.requires_grad_() for t in _qkv(seed=3))
    out = far_decay_attention(q, k, v, tokens_per_frame=6, train_frames=4)
    out.square().sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    far_decay_reference(qd, kd, vd, tokens_per_frame=6, train_frames=4).square().sum().backward()
    assert (q.grad.double() - qd.grad).abs().max() <= 1e-5
    with torch.inference_mode():  # and without autograd it is the regions path, same numbers
        assert (far_decay_attention(q, k, v, tokens_per_frame=6, train_frames=4) - out.detach()).abs().max() <= 1e-6


def test_flex_score_mod_equals_the_reference():
    q, k, v = _qkv(seed=1)
    kw = dict(tokens_per_frame=6, train_frames=4, alpha=0.85)
    ours = far_decay_attention(q.double(), k.double(), v.double(), backend="flex", **kw)
    assert (ours - far_decay_reference(q, k, v, **kw)).abs().max() <= 1e-10


def test_the_rule_matters_and_so_does_centring():
    q, k, v = _qkv(seed=2)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    decayed = far_decay_attention(q, k, v, tokens_per_frame=6, train_frames=4)
    assert (decayed - plain).abs().max() > 1e-2
    uncentred = far_decay_attention(q, k, v, tokens_per_frame=6, train_frames=4, center_k=False)
    assert (decayed - uncentred).abs().max() > 1e-3
    assert torch.allclose(far_decay_attention(q, k, v, tokens_per_frame=6, train_frames=4, alpha=1.0,
                                              first_frame="off"), plain, atol=1e-5)  # alpha 1, no mask: vanilla
