"""nets.cut: a part of a net keeps the whole net's names and keys, so prefix and suffix compose
to the whole net (train and eval, dropout masks included) and a part's init is the matching
subset of the whole init; layers are found by their torch names, blocks by their records' ops.
"""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import nets
from layers import random as jr
from nets.compose import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Layer, Linear,
                          MaxPool2d, ReLU, as_net, serial)

pytestmark = pytest.mark.usefixtures("one_thread")


def nested_net():
    """Three levels of serial, dropout at two depths, batch norm: every path of the key split."""
    block1 = serial(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2), Dropout(0.2))
    block2 = serial(Conv2d(4, 5, 3, padding=1, bias=False), BatchNorm2d(5), ReLU(), MaxPool2d(2))
    head = serial(AdaptiveAvgPool2d(1), Flatten(), Dropout(0.5), Linear(5, 3))
    return as_net(serial(features=serial(block1, block2), head=head), name="nested")


TINY = {
    "nested": nested_net,
    "vgg_like": lambda: nets.vgg_like(((4,), (6, 6)), num_classes=3, dropout=0.3, head_dropout=0.4),
}
SEEDS = st.integers(0, 2**31 - 1)


def _x(seed, n=4):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _last_leaf_index(net, name):
    """Index in ``leaf_names(net)`` of the last leaf at or below ``name``: where a cut falls."""
    return max(i for i, n in enumerate(nets.leaf_names(net)) if n == name or n.startswith(name + "."))


@st.composite
def cut_point(draw, *, leaves_something_after=False):
    """A tiny net and one of its torch names, leaf or block."""
    which = draw(st.sampled_from(sorted(TINY)))
    net = TINY[which]()
    names = nets.layer_names(net)
    if leaves_something_after:
        names = [n for n in names if _last_leaf_index(net, n) < len(nets.leaf_names(net)) - 1]
    return net, draw(st.sampled_from(names))


def _subset(tree, keys):
    return {k: tree[k] for k in keys}


def _assert_trees_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- looking layers up

@pytest.mark.parametrize("which", sorted(TINY))
def test_child_finds_every_layer_by_its_torch_name(which):
    net = TINY[which]()
    by_leaf = dict(nets.leaves(net.layer))
    for name in nets.layer_names(net):
        layer = nets.child(net, name)
        assert isinstance(layer, Layer)
        if not layer.children:
            assert layer is by_leaf[name]
        # the child's local parameter names are the net's, less the child's own name
        own = {k[len(name) + 1:] for k in net.layer.param_shapes if k.startswith(name + ".")}
        assert set(layer.param_shapes) == own


def test_child_finds_vgg16s_head_by_name_without_indexing_children():
    head = nets.child(nets.vgg16(num_classes=256), "classifier.6")
    assert head.op == "Linear"
    assert dict(head.param_shapes) == {"weight": (256, 4096), "bias": (256,)}


@settings(max_examples=40)
@given(which=st.sampled_from(sorted(TINY)),
       name=st.one_of(st.text(alphabet="featurshd.0123456789", min_size=1, max_size=14),
                      st.sampled_from(["features.9", "head.3.weight", "features.0.7", "", "head."])))
def test_an_unknown_name_raises_listing_the_names_where_the_lookup_failed(which, name):
    net = TINY[which]()
    assume(name not in nets.layer_names(net))
    with pytest.raises(ValueError, match=rf"child: expected the torch name of a layer of {which}, "
                                         rf"got {name!r}; .*(holds \[|is a leaf)"):
        nets.child(net, name)
    with pytest.raises(ValueError, match=rf"cut: expected the torch name of a layer of {which}"):
        nets.cut(net, upto=name)


def test_the_error_lists_the_children_of_the_deepest_layer_found():
    with pytest.raises(ValueError, match=r"got 'classifier.7'; 'classifier' holds \['classifier.0', "
                                         r"'classifier.1', .*'classifier.6'\]"):
        nets.child(nets.vgg16(), "classifier.7")
    with pytest.raises(ValueError, match=r"got 'feature.1'; vgg16 holds \['features', 'avgpool', "
                                         r"'flatten', 'classifier'\]"):
        nets.child(nets.vgg16(), "feature.1")
    with pytest.raises(ValueError, match=r"'features.3' is a leaf \(ReLU\)"):
        nets.child(nets.vgg16(), "features.3.weight")


def test_every_leaf_record_names_its_torch_class_as_data():
    for make in (nets.model_a, nets.model_b, nets.model_c, nested_net,
                 lambda: nets.vgg16(batch_norm=True)):
        net = make()
        for name, leaf in nets.leaves(net.layer):
            assert leaf.op in {"Conv2d", "Linear", "BatchNorm2d", "ReLU", "MaxPool2d",
                               "AdaptiveAvgPool2d", "Flatten", "Dropout"}, name
            assert leaf.kind.startswith(leaf.op), name       # the display string agrees with it
        assert net.layer.op == "Sequential"
        assert nets.leaf_names(net, op="ReLU") == tuple(n for n, leaf in nets.leaves(net.layer)
                                                        if leaf.op == "ReLU")


# ----------------------------------------------------------------------------- block ends

@pytest.mark.parametrize("make, ends", [
    (nets.model_a, ("features.5", "features.11")),
    (nets.model_b, ("features.6", "features.14", "features.22")),
    (nets.model_c, ("features.6", "features.17", "features.28")),
    (nets.vgg16, ("features.4", "features.9", "features.16", "features.23", "features.30")),
    (lambda: nets.vgg16(batch_norm=True),
     ("features.6", "features.13", "features.23", "features.33", "features.43")),
], ids=["model_a", "model_b", "model_c", "vgg16", "vgg16_bn"])
def test_block_ends_are_the_max_pools_closing_each_block(make, ends):
    net = make()
    assert nets.block_ends(net) == ends
    side = 224 if net.name.startswith("vgg16") else 32
    for k, end in enumerate(ends, start=1):        # each block halves the side
        out = nets.summary(nets.cut(net, upto=end), (1, 3, side, side), show=False).output_shape
        assert out[2:] == (side >> k, side >> k)


@pytest.mark.parametrize("batch_norm", [False, True], ids=["vgg16", "vgg16_bn"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_vgg16_cut_through_block_k_is_truncate_after_block_k(batch_norm, k):
    net = nets.vgg16(batch_norm=batch_norm)
    part = nets.cut(net, upto=nets.block_ends(net)[k - 1])
    truncated = nets.vgg16(batch_norm=batch_norm, truncate_after_block=k)
    assert dict(part.layer.param_shapes) == dict(truncated.layer.param_shapes)
    assert dict(part.layer.state_shapes) == dict(truncated.layer.state_shapes)
    assert (nets.summary(part, (1, 3, 224, 224), show=False).output_shape
            == nets.summary(truncated, (1, 3, 224, 224), show=False).output_shape)


# ----------------------------------------------------------------------------- keys and init

def _spy(log, name):
    """A leaf that records the keys it is given by init and by a training apply."""
    def init(key, *, dtype=torch.float32, device=None):
        log.append(("init", name, key))
        return {}, {}

    def apply(params, state, x, *, train, key=None):
        log.append(("apply", name, key))
        return x, state

    return Layer(name, init, apply, lambda s: s, lambda s: 0, {}, {}, stochastic=True, op="Spy")


@settings(max_examples=15)
@given(seed=SEEDS)
def test_leaf_keys_are_the_keys_serial_hands_each_leaf_in_init_and_apply(seed):
    log = []
    layer = serial(a=serial(_spy(log, "a0"), serial(_spy(log, "a1a"), _spy(log, "a1b"))),
                   b=_spy(log, "b"))
    net = as_net(layer, name="spies")
    key = jr.key(seed)
    net.init(key)
    net.apply({}, {}, torch.zeros(1), train=True, key=key)
    expected = nets.leaf_keys(net, key)
    assert list(expected) == ["a.0", "a.1.0", "a.1.1", "b"]
    got = [k for _, _, k in log]
    assert len(got) == 8
    for mine, theirs in zip(got, list(expected.values()) * 2):
        assert torch.equal(mine, theirs)
    assert len({tuple(k.tolist()) for k in expected.values()}) == 4
    assert set(nets.leaf_keys(net, None).values()) == {None}


@settings(max_examples=25)
@given(point=cut_point(), seed=SEEDS, side=st.sampled_from(["upto", "after"]))
def test_a_part_inits_to_the_matching_subset_of_the_whole_nets_init(point, seed, side):
    net, at = point
    order, stop = nets.leaf_names(net), _last_leaf_index(net, at)
    if side == "after" and stop == len(order) - 1:
        side = "upto"                                   # nothing after the last layer
    part = nets.cut(net, **{side: at})
    params, state = net.init(jr.key(seed))
    p, s = part.init(jr.key(seed))
    _assert_trees_equal(p, _subset(params, part.layer.param_shapes))
    _assert_trees_equal(s, _subset(state, part.layer.state_shapes))
    assert nets.leaf_names(part) == (order[:stop + 1] if side == "upto" else order[stop + 1:])


@settings(max_examples=25)
@given(point=cut_point(leaves_something_after=True), seed=SEEDS, train=st.booleans())
def test_the_part_after_a_cut_applied_to_the_part_upto_it_is_the_whole_net(point, seed, train):
    net, at = point
    params, state = net.init(jr.key(seed))
    _, state = net.apply(params, state, _x(seed + 1), train=True, key=jr.key(seed + 2))  # stats move
    x, key = _x(seed), jr.key(seed + 3)
    whole, whole_state = net.apply(params, state, x, train=train, key=key)
    prefix, suffix = nets.cut(net, upto=at), nets.cut(net, after=at)
    h, s1 = prefix.apply(_subset(params, prefix.layer.param_shapes),
                         _subset(state, prefix.layer.state_shapes), x, train=train, key=key)
    y, s2 = suffix.apply(_subset(params, suffix.layer.param_shapes),
                         _subset(state, suffix.layer.state_shapes), h, train=train, key=key)
    assert torch.equal(y, whole)                        # same ops, same masks: bit for bit
    _assert_trees_equal({**s1, **s2}, whole_state)


@settings(max_examples=15)
@given(seed=SEEDS, cuts=st.lists(st.sampled_from(nets.leaf_names(nested_net())[:-1]), min_size=2,
                                 max_size=2, unique=True))
def test_a_cut_of_a_cut_is_the_stretch_between_the_two_names(seed, cuts):
    net = nested_net()
    order = nets.leaf_names(net)
    a, b = sorted(cuts, key=order.index)
    middle = nets.cut(nets.cut(net, after=a), upto=b)
    assert nets.leaf_names(middle) == order[order.index(a) + 1:order.index(b) + 1]
    params, state = net.init(jr.key(seed))
    p, s = middle.init(jr.key(seed))
    _assert_trees_equal(p, _subset(params, middle.layer.param_shapes))
    x, key = _x(seed), jr.key(seed + 1)
    parts = [nets.cut(net, upto=a), middle, nets.cut(net, after=b)]
    h = x
    for part in parts:
        h, _ = part.apply(_subset(params, part.layer.param_shapes),
                          _subset(state, part.layer.state_shapes), h, train=True, key=key)
    assert torch.equal(h, net.apply(params, state, x, train=True, key=key)[0])


def test_a_childs_init_from_its_leaf_key_is_the_whole_nets_init_of_that_layer():
    net = nested_net()
    params, _ = net.init(jr.key(5))
    head = nets.child(net, "head.3")
    fresh, _ = head.init(nets.leaf_keys(net, jr.key(5))["head.3"])
    _assert_trees_equal({f"head.3.{k}": v for k, v in fresh.items()},
                        _subset(params, [k for k in params if k.startswith("head.3.")]))


def test_a_suffix_trains_under_grad_on_the_prefixs_features():
    net = nested_net()
    params, state = net.init(jr.key(0))
    prefix, suffix = nets.cut(net, upto="features"), nets.cut(net, after="features")
    h, _ = prefix.apply(_subset(params, prefix.layer.param_shapes),
                        _subset(state, prefix.layer.state_shapes), _x(0), train=False)
    trained = _subset(params, suffix.layer.param_shapes)

    def loss(p):
        logits, new_state = suffix.apply(p, {}, h, train=True, key=jr.key(1))
        return logits.square().mean(), new_state

    grads, _ = torch.func.grad(loss, has_aux=True)(trained)
    assert grads.keys() == {"head.3.weight", "head.3.bias"}
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())


# ----------------------------------------------------------------------------- argument errors

def test_cut_takes_exactly_one_of_upto_and_after_and_refuses_to_cut_after_the_end():
    net = nested_net()
    with pytest.raises(TypeError, match=r"cut: expected exactly one of upto= and after="):
        nets.cut(net)
    with pytest.raises(TypeError, match=r"cut: expected exactly one of upto= and after="):
        nets.cut(net, upto="features", after="head")
    with pytest.raises(ValueError, match=r"cut: expected a layer of nested before its last one, "
                                         r"got after='head', which leaves nothing"):
        nets.cut(net, after="head")
    with pytest.raises(TypeError, match=r"cut: expected a nets Net, got Layer"):
        nets.cut(net.layer, upto="head")
    assert nets.cut(net, upto="head").layer is net.layer
    assert nets.cut(net, upto="features.1.2").name == "nested[upto features.1.2]"
    assert nets.cut(net, after="features.1.2").name == "nested[after features.1.2]"


def test_outputs_at_block_ends_equal_the_truncated_vgg16_of_each_block():
    # The 224 shapes of every block are tests/test_nets_vgg16.py's
    # test_truncation_after_each_block_halves_the_side_and_follows_the_widths; here the values.
    g = torch.Generator().manual_seed(0)
    net = nets.vgg16(truncate_after_block=3)
    params = {k: torch.randn(s, generator=g) * (0.1 if k.endswith("weight") else 0.01)
              for k, s in net.layer.param_shapes.items()}
    x = torch.randn(2, 3, 32, 32, generator=g)
    outs = nets.outputs_at(net, params, {}, x)
    assert [tuple(o.shape) for o in outs] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    for k in (1, 2, 3):
        sub = nets.vgg16(truncate_after_block=k)
        y, _ = sub.apply({n: params[n] for n in sub.layer.param_shapes}, {}, x, train=False)
        assert torch.equal(outs[k - 1], y)


def test_outputs_at_refuses_unknown_or_unordered_names():
    net = nets.model_b()
    params, state = net.init(jr.key(0))
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="outputs_at: expected the torch name of a layer"):
        nets.outputs_at(net, params, state, x, ["features.99"])
    with pytest.raises(ValueError, match="in the order"):
        nets.outputs_at(net, params, state, x, ["features.10", "features.3"])
