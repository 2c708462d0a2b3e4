"""The ensemble's flat-buffer optimizer (``optim.vmapped(..., flat=True)``, the default of
``ensemble_parts``): bit-identical to stepping leaf by leaf, the state keeps its structure, and a
step reuses the buffer the last one laid out."""
import pytest
import torch
from torch.utils import _pytree as pytree

import layers
import optim
from experiments import train as trainer
from layers import random as jr
from nets.compose import BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, as_net, serial
from optim.ensemble import FLAT, _Flat

OPTIMIZERS = {
    "sgd momentum": lambda lr, momentum: optim.sgd(lr, momentum=momentum),
    "sgd nesterov + decay": lambda lr, momentum: optim.sgd(lr, momentum=momentum, nesterov=True,
                                                           weight_decay=1e-3),
    "adam + decay": lambda lr, momentum: optim.adam(lr, betas=(momentum, 0.999), weight_decay=1e-4),
}


def small_net():
    return as_net(serial(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), Conv2d(4, 5, 3),
                         MaxPool2d(2), Flatten(), Linear(5 * 3 * 3, 3)), name="small")


def train(make, flat, k, dtype, lrs, steps=3):
    net_k, opt_k, loss_k = trainer.ensemble_parts(small_net(), make, {"lr": lrs, "momentum": [0.9] * k},
                                                  layers.cross_entropy, flat=flat)
    keys = torch.stack([jr.key(i) for i in range(k)])
    params, state = net_k.init(keys, dtype=dtype)
    trees = [params, state, opt_k.init(params)]
    step = trainer.make_step(net_k, opt_k, loss_k)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8, generator=g, dtype=dtype), torch.arange(6) % 3
    for _ in range(steps):
        *trees, _ = step(*trees, (x, y), keys)
    return trees


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3])
def test_the_flat_optimizer_gives_the_bits_of_stepping_leaf_by_leaf(name, dtype, k):
    # a diverging member too: lr 1e100 overflows within 3 steps in both dtypes (1e30 did in
    # float64 only while batch norm's statistics overflowed; one batch norm of the members side
    # by side keeps them finite, so that member's parameters stay finite, about 1e207)
    lrs = [0.05, 1e100, 0.01][:k] if k > 1 else [0.05]
    leaves = train(OPTIMIZERS[name], False, k, dtype, lrs)
    flat = train(OPTIMIZERS[name], True, k, dtype, lrs)
    assert pytree.tree_structure(leaves) == pytree.tree_structure(flat)
    for a, b in zip(pytree.tree_leaves(leaves), pytree.tree_leaves(flat)):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if k > 1 and name.startswith("sgd"):   # (Adam's steps are about lr: 3 of them stay finite)
        assert flat[2].diverged.tolist() == [False, True, False]


def test_a_step_finds_its_parameters_and_state_laid_out_and_copies_none_of_them():
    params, _, opt_state = train(OPTIMIZERS["sgd momentum"], True, 2, torch.float32, [0.1, 0.01])
    layout = _Flat(params, 2)
    packed = layout.pack((params, opt_state.inner))
    first = pytree.tree_leaves(params)[0]
    assert packed[0][FLAT].data_ptr() == first._base.data_ptr()      # no copy: the same buffer
    back = layout.unpack(packed[0])
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(back), pytree.tree_leaves(params)))
    # a tree that is not laid out (a fresh copy) is packed by one copy, with the same values
    copied = {n: t.clone() for n, t in params.items()}
    assert torch.equal(layout.pack(copied)[FLAT], packed[0][FLAT])
