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


def _members(seed, k, n, dtypes, scale):
    """``k`` members' gradient trees stacked on a leading dimension (leaves of mixed shapes and
    dtypes), and the list of the members' own trees."""
    g = torch.Generator().manual_seed(seed)
    stacked = {f"p{i}": (scale * torch.randn((k, *SHAPES[i]), generator=g, dtype=torch.float64)).to(dtypes[i])
               for i in range(n)}
    return stacked, [{name: x[m] for name, x in stacked.items()} for m in range(k)]


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 3), n=st.integers(1, len(SHAPES)),
       dtypes=st.lists(st.sampled_from([torch.float32, torch.float64]), min_size=len(SHAPES), max_size=len(SHAPES)),
       scale=st.sampled_from([1e-3, 1.0, 100.0]),
       # 0 or no tinier than 1e-3: a max_norm near 1e-38 scales float32 leaves into the subnormals,
       # where an ulp of the clip factor is no longer a relative error of 1e-7
       max_norm=st.just(0.0) | st.floats(1e-3, 20.0))
def test_global_norm_and_clipping_under_vmap_use_each_members_own_norm(seed, k, n, dtypes, scale, max_norm):
    stacked, members = _members(seed, k, n, dtypes, scale)
    clip = optim.clip_by_global_norm(max_norm)
    norms = torch.func.vmap(lambda t: optim.global_norm(list(t.values())))(stacked)
    clipped = torch.func.vmap(lambda t: clip.update(t, ())[0])(stacked)
    for m, tree in enumerate(members):
        # Under vmap the per-leaf norms are stacked in leaf order, eagerly in torch's
        # (device, dtype)-grouped order: the sum of squares may round differently, by a few ulps
        # of the float64 total (norms of float32 leaves promote to float64 when mixed).
        want = torch.nn.utils.get_total_norm(list(tree.values()))
        torch.testing.assert_close(norms[m], want, rtol=1e-6, atol=0)
        ours, _ = clip.update(tree, ())
        for name, x in ours.items():
            # the clip factor inherits that rounding: 2 ulps of float32
            assert clipped[name][m].dtype == x.dtype
            torch.testing.assert_close(clipped[name][m], x, rtol=2.5e-7, atol=0)


def test_global_norm_of_leaves_on_several_devices_is_on_the_first_leafs_device_like_torch():
    leaves = [torch.ones(3, device="meta"), torch.ones(2)]   # per-device norms gathered on 'meta'
    got, want = optim.global_norm(leaves), torch.nn.utils.get_total_norm(leaves)
    assert (got.device, got.dtype, got.shape) == (want.device, want.dtype, want.shape)


def test_clip_by_global_norm_refuses_a_non_tensor_leaf_naming_itself_and_the_path():
    clip = optim.clip_by_global_norm(1.0)
    with pytest.raises(TypeError, match=r"^clip_by_global_norm\.update: expected tensor leaves, got float in "
                                        r"updates at 'w/1'$"):
        clip.update({"w": [torch.ones(2), 1.0]}, ())


@pytest.mark.parametrize("updates_owned", [False, True])
def test_clip_by_global_norm_donated_update_gives_the_pure_bits_writing_only_owned_updates(updates_owned):
    updates = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([[12.0]], dtype=torch.float64)}   # norm 13
    before = {k: v.clone() for k, v in updates.items()}
    clip = optim.clip_by_global_norm(1.0)
    pure, _ = clip.update(before, ())
    out, _, out_owned = clip.donated_update(updates, (), None, updates_owned)
    assert out_owned   # the clipped updates are temporaries of the step (copies, or the owned inputs)
    for k in pure:
        assert torch.equal(out[k], pure[k])
    if updates_owned:   # written into: the very tree and tensors it was given
        assert out is updates and all(out[k] is updates[k] for k in updates)
    else:
        assert all(torch.equal(updates[k], before[k]) and out[k] is not updates[k] for k in updates)


@pytest.mark.parametrize("batched", [False, True])
def test_clip_by_global_norm_never_leaves_a_leaf_off_the_norms_device_unclipped(batched):
    # The norm is gathered on the first leaf's device ('meta' here), as torch's; the factor must
    # then be moved to each leaf's device: a 'meta' factor does not reach the data of a CPU leaf
    # (a CPU tensor times a 0-d meta tensor is left as it was), and moving it raises, as in
    # torch.nn.utils.clip_grad_norm_(foreach=False): never a silently unclipped leaf.
    updates = {"a": torch.ones(3, device="meta"), "b": torch.full((2,), 100.0)}
    clip = optim.clip_by_global_norm(1.0)
    update = (lambda u: clip.update(u, ())[0])
    if batched:
        updates, update = {k: v.expand(2, *v.shape).clone() for k, v in updates.items()}, torch.func.vmap(update)
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        update(updates)
