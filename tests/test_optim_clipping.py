"""clip_by_global_norm equals torch.nn.utils.clip_grad_norm_(foreach=True) on drawn trees."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optim

SHAPES = [(3,), (4, 5), (2, 3, 3, 3), (), (7, 2)]


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, len(SHAPES)),
       dtypes=st.lists(st.sampled_from([torch.float32, torch.float64]), min_size=len(SHAPES), max_size=len(SHAPES)),
       scale=st.sampled_from([1e-3, 1.0, 100.0]), max_norm=st.floats(0.0, 20.0))
def test_clip_by_global_norm_equals_clip_grad_norm_(seed, n, dtypes, scale, max_norm):
    g = torch.Generator().manual_seed(seed)
    grads = {f"p{i}": (scale * torch.randn(SHAPES[i], generator=g, dtype=torch.float64)).to(dtypes[i])
             for i in range(n)}
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads.values()]
    for p, x in zip(params, grads.values()):
        p.grad = x.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    clip = optim.clip_by_global_norm(max_norm)
    clipped, _ = clip.update(grads, clip.init(grads))
    # Same foreach operations in the same (device, dtype)-grouped order as torch: bit-identical.
    for p, x in zip(params, clipped.values()):
        assert x.dtype == p.grad.dtype
        assert torch.equal(x, p.grad)
    assert torch.equal(optim.global_norm(list(grads.values())), total)


def test_clip_by_global_norm_leaves_small_gradients_unchanged():
    grads = {"w": torch.tensor([0.3, 0.4], dtype=torch.float64)}   # norm 0.5
    clip = optim.clip_by_global_norm(1.0)
    out, _ = clip.update(grads, clip.init(grads))
    assert torch.equal(out["w"], grads["w"])


def test_clip_by_global_norm_rescales_to_max_norm_with_torch_eps():
    grads = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}   # norm 5
    clip = optim.clip_by_global_norm(1.0)
    out, _ = clip.update(grads, clip.init(grads))
    torch.testing.assert_close(out["w"], grads["w"] * (1.0 / (5.0 + 1e-6)), rtol=0, atol=1e-15)


@pytest.mark.parametrize("bad, err, match", [
    (-1.0, ValueError, r"clip_by_global_norm: expected max_norm >= 0, got -1.0"),
    (float("nan"), ValueError, r"clip_by_global_norm: expected max_norm >= 0, got nan"),
    ("1", TypeError, r"clip_by_global_norm: expected max_norm to be a real number, got str"),
])
def test_invalid_max_norm_raises(bad, err, match):
    with pytest.raises(err, match=match):
        optim.clip_by_global_norm(bad)
