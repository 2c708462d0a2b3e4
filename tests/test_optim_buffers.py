"""Recycled output storage (optim.buffers): bit-identical results, and never a tensor someone holds."""
import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import optim
from optim import buffers

CONFIGS = {
    "sgd_nesterov_wd": (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)),
    "sgd_dampened_max": (lambda: optim.sgd(0.05, momentum=0.5, dampening=0.3, maximize=True),
                         lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.3, maximize=True, foreach=True)),
    "adam_l2_amsgrad": (lambda: optim.adam(1e-2, weight_decay=1e-2, amsgrad=True),
                        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True, foreach=True)),
    "adamw_max": (lambda: optim.adamw(1e-2, weight_decay=0.1, maximize=True),
                  lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, maximize=True, foreach=True)),
}
SHAPES = [(6, 5), (5,), (3, 2, 2), ()]


@contextlib.contextmanager
def recycling_everything():
    """Route every tensor, however small, through the pool (the default skips tensors < 1 MiB)."""
    saved = buffers.MIN_BYTES
    buffers.MIN_BYTES = 0
    buffers.release_buffers()
    try:
        yield
    finally:
        buffers.MIN_BYTES = saved
        buffers.release_buffers()


@pytest.fixture
def recycle_everything():
    with recycling_everything():
        yield


def snapshot(tree):
    return [x.clone() for x in pytree.tree_leaves(tree)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(deadline=None, max_examples=5)
@given(seed=st.integers(0, 2**31 - 1), keep_history=st.booleans())
def test_recycled_steps_are_bit_identical_to_torch_and_never_touch_held_tensors(name, seed, keep_history):
    with recycling_everything():
        run_recycled(name, seed, keep_history)


def run_recycled(name, seed, keep_history):
    make_ours, make_torch = CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(s, generator=g, dtype=torch.float64) for i, s in enumerate(SHAPES)}
    tparams = [torch.nn.Parameter(p.clone()) for p in params.values()]
    opt, topt = make_ours(), make_torch(tparams)
    state = opt.init(params)
    history = []   # (tree, snapshot) pairs the caller still holds
    addresses = set()
    for _ in range(12):
        grads = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
        for tp, gr in zip(tparams, grads.values()):
            tp.grad = gr.clone()
        topt.step()
        if keep_history:
            history.append(((params, state, grads), snapshot((params, state, grads))))
        params, state = optim.step(opt, grads, state, params)
        addresses.add(params["p0"].data_ptr())
        for x, tp in zip(params.values(), tparams):
            assert torch.equal(x, tp.detach())
    for tree, snap in history:
        assert all(torch.equal(x, y) for x, y in zip(pytree.tree_leaves(tree), snap))
    # Held history forces fresh storage every step; dropped trees are recycled (old params,
    # state and temporaries of the same shape circulate, so new params land in one of them).
    assert len(addresses) == 12 if keep_history else len(addresses) < 12


def test_dropped_outputs_are_reused_and_held_ones_are_not(recycle_everything):
    x = [torch.randn(64, dtype=torch.float64)]
    a = buffers.add(x, x, alpha=2.0)
    address = a[0].data_ptr()
    b = buffers.add(x, x, alpha=2.0)
    assert b[0].data_ptr() != address          # a is still held
    view = b[0].view(8, 8)
    del a
    c = buffers.add(x, x, alpha=3.0)
    assert c[0].data_ptr() == address          # a was dropped: its storage is reused
    torch.testing.assert_close(c[0], 4 * x[0], rtol=0, atol=0)
    b_address = b[0].data_ptr()
    del b
    d = buffers.mul(x, 5.0)
    assert d[0].data_ptr() != b_address        # b's storage is still seen through `view`
    assert view.data_ptr() == b_address


def test_inputs_under_autograd_or_torch_func_take_the_plain_foreach_path(recycle_everything):
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = buffers.add([x], [x], alpha=2.0)[0]
    assert y.requires_grad and buffers.pooled_count() == 0
    g = torch.func.grad(lambda v: buffers.mul([v], 3.0)[0].sum())(torch.ones(3))
    torch.testing.assert_close(g, torch.full((3,), 3.0), rtol=0, atol=0)
    assert buffers.pooled_count() == 0


def test_release_buffers_empties_the_pool(recycle_everything):
    buffers.add([torch.ones(3)], [torch.ones(3)])
    assert buffers.pooled_count() == 1
    buffers.release_buffers()
    assert buffers.pooled_count() == 0
