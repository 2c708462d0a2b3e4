"""Purity: no layer modifies its arguments (params, state, x, key), in either formulation."""
import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

import layers
from layers import random as jr


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def calls():
    """(name, args tree, function of the args) covering every layer in its most stateful mode."""
    x4 = randn(3, 2, 5, 5, seed=1)
    bn_state = {"running_mean": randn(2, seed=2), "running_var": randn(2, seed=3).abs() + 0.5,
                "num_batches_tracked": torch.tensor(4)}
    bn_params = {"weight": randn(2, seed=4), "bias": randn(2, seed=5)}
    conv_p = {"weight": randn(3, 2, 3, 3, seed=6), "bias": randn(3, seed=7)}
    lin_p = {"weight": randn(4, 5, seed=8), "bias": randn(4, seed=9)}
    target = torch.tensor([0, 3, -100])
    return [
        ("linear", (lin_p, randn(3, 5, seed=10)), lambda a, i: layers.linear(*a, impl=i)),
        ("conv2d", (conv_p, x4), lambda a, i: layers.conv2d(*a, padding="same", groups=1, impl=i)),
        ("max_pool2d", (x4,), lambda a, i: layers.max_pool2d(*a, 3, 2, 1, ceil_mode=True, impl=i)),
        ("adaptive_avg_pool2d", (x4,), lambda a, i: layers.adaptive_avg_pool2d(*a, 3, impl=i)),
        ("batch_norm train", (bn_params, bn_state, x4),
         lambda a, i: layers.batch_norm(*a, train=True, impl=i)),
        ("batch_norm train momentum None", (bn_params, bn_state, x4),
         lambda a, i: layers.batch_norm(*a, train=True, momentum=None, impl=i)),
        ("batch_norm eval", (bn_params, bn_state, x4), lambda a, i: layers.batch_norm(*a, train=False, impl=i)),
        ("dropout", (x4, jr.key(0)), lambda a, i: layers.dropout(a[0], p=0.3, train=True, key=a[1], impl=i)),
        ("relu", (x4,), lambda a, i: layers.relu(*a, impl=i)),
        ("gelu", (x4,), lambda a, i: layers.gelu(*a, impl=i)),
        ("flatten", (x4,), lambda a, i: layers.flatten(*a, impl=i)),
        ("log_softmax", (x4,), lambda a, i: layers.log_softmax(*a, 1, impl=i)),
        ("cross_entropy", (randn(3, 4, seed=11), target, randn(4, seed=12).abs()),
         lambda a, i: layers.cross_entropy(a[0], a[1], weight=a[2], label_smoothing=0.1, impl=i)),
    ]


@pytest.mark.parametrize("impl", ["fast", "explicit"])
@pytest.mark.parametrize("case", range(len(calls())), ids=[c[0] for c in calls()])
def test_layer_leaves_every_argument_unchanged(case, impl):
    name, args, f = calls()[case]
    before = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, args)
    versions = [t._version for t in tree_flatten(args)[0]]
    structure = tree_flatten(args)[1]
    f(args, impl)
    leaves, after_structure = tree_flatten(args)
    assert after_structure == structure, f"{name}: argument containers changed"
    assert [t._version for t in leaves] == versions, f"{name}: an argument was written in place"
    for a, b in zip(leaves, tree_flatten(before)[0]):
        assert torch.equal(a, b), f"{name}: an argument changed value"


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_batch_norm_eval_returns_the_state_it_was_given(impl):
    state = {"running_mean": torch.zeros(2), "running_var": torch.ones(2), "num_batches_tracked": torch.tensor(1)}
    _, new = layers.batch_norm({}, state, torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
                               train=False, impl=impl)
    assert new is state
