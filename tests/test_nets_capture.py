"""nets.capture / capture_grads: the named activations are what torch.nn forward hooks see on the
functional_call reference, their gradients what full backward hooks see; logits, state and
dropout masks are net.apply's; pure, and it works under torch.func grad, vjp and vmap."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import layers
import nets
from layers import random as jr
from nets.compose import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear,
                          MaxPool2d, ReLU, as_net, serial)
from reference_modules import model_b_module

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64
# float64 throughout. Ours and the reference run the same ops up to summation order (conv sums
# <= 4*3*3 = 36 products, batch norm reduces <= 3*8*8 = 192 values), so values and gradients
# agree to ~1e-13; 1e-10 leaves room without hiding a wrong layer (those are off by O(1)).
TOL = dict(rtol=1e-10, atol=1e-10)


def tiny_net(p=0.0):
    features = serial(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2), Dropout(p),
                      Conv2d(4, 5, 3, padding=1, bias=False), BatchNorm2d(5), ReLU(), MaxPool2d(2))
    classifier = serial(AdaptiveAvgPool2d(1), Flatten(), Dropout(p), Linear(5, 3))
    return as_net(serial(features=features, classifier=classifier), name="tiny")


def tiny_module():
    """The torch.nn twin of ``tiny_net`` (the same state_dict() names; dropout 0)."""
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Dropout(0.0), nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5),
                             nn.ReLU(), nn.MaxPool2d(2))
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.0), nn.Linear(5, 3))
    return nn.Sequential(OrderedDict(features=features, classifier=classifier)).to(D)


def trees(net, seed):
    params, state = net.init(jr.key(seed), dtype=D)
    g = torch.Generator().manual_seed(seed)
    # Running statistics away from (0, 1), so eval mode is not the identity.
    state = {k: (v + torch.rand(v.shape, generator=g, dtype=D) if v.is_floating_point() else v)
             for k, v in state.items()}
    return params, state


def x_of(seed, n=3, size=8):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed + 1), dtype=D)


def hooked_reference(module, params, state, x, names, *, train, backward=None):
    """``(logits, new_state, {name: forward-hook output}, {name: backward-hook grad_output})``
    of ``functional_call(module, {**params, **clones of state}, x)``; ``backward(logits)`` is the
    loss to backpropagate (no backward pass when None)."""
    modules = dict(module.named_modules())
    outputs, grads, handles = {}, {}, []
    for name in names:
        handles.append(modules[name].register_forward_hook(
            lambda m, i, o, name=name: outputs.__setitem__(name, o)))
        if backward is not None:
            handles.append(modules[name].register_full_backward_hook(
                lambda m, gi, go, name=name: grads.__setitem__(name, go[0])))
    module.train(train)
    buffers = {k: v.clone() for k, v in state.items()}
    leaves = {k: v.clone().requires_grad_(backward is not None) for k, v in params.items()}
    x = x.clone().requires_grad_(backward is not None)      # so every module's full hook fires
    try:
        logits = functional_call(module, {**leaves, **buffers}, (x,))
        if backward is not None:
            backward(logits).backward()
    finally:
        for h in handles:
            h.remove()
    return logits.detach(), buffers, {k: v.detach() for k, v in outputs.items()}, grads


def assert_trees_close(a, b, **tol):
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"{k}: {m}")


NAMES = nets.layer_names(tiny_net())


@settings(max_examples=12)
@given(names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4), train=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_captured_activations_equal_torch_forward_hooks_and_logits_and_state_equal_apply(names, train, seed):
    net = tiny_net()
    params, state = trees(net, seed)
    x = x_of(seed)
    logits, new_state, acts = nets.capture(net, params, state, x, names=names, train=train)
    ref_logits, ref_state, ref_acts, _ = hooked_reference(tiny_module(), params, state, x, names, train=train)
    assert list(acts) == list(nets.captured_names(net, names))     # apply order, each once
    assert set(acts) == set(names)
    assert_trees_close(acts, {k: ref_acts[k] for k in acts}, **TOL)
    apply_logits, apply_state = net.apply(params, state, x, train=train)
    assert torch.equal(logits, apply_logits)                        # the same ops: bit for bit
    assert new_state.keys() == apply_state.keys()
    for k in new_state:
        assert torch.equal(new_state[k], apply_state[k]), k
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert_trees_close(new_state, {k: ref_state[k] for k in new_state}, **TOL)


@settings(max_examples=10)
@given(names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4), train=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**31 - 1))
def test_capture_grads_equal_torch_full_backward_hooks(names, train, smoothing, seed):
    net = tiny_net()
    params, state = trees(net, seed)
    x = x_of(seed)
    target = torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(seed))
    loss = lambda logits: layers.cross_entropy(logits, target, label_smoothing=smoothing)   # noqa: E731
    out = nets.capture_grads(net, params, state, x, loss, names=names, train=train)
    *_, ref_acts, ref_grads = hooked_reference(tiny_module(), params, state, x, names, train=train,
                                                backward=loss)
    assert list(out.grads) == list(out.activations) == list(nets.captured_names(net, names))
    for k in out.grads:
        assert out.grads[k].shape == out.activations[k].shape
    assert_trees_close(out.activations, {k: ref_acts[k] for k in out.activations}, **TOL)
    assert_trees_close(out.grads, {k: ref_grads[k] for k in out.grads}, **TOL)
    torch.testing.assert_close(out.loss, loss(net.apply(params, state, x, train=train)[0]), **TOL)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_capture_and_capture_grads_on_model_b_equal_hooks_on_its_torch_twin():
    net = nets.model_b()
    params, state = trees(net, 0)
    x = x_of(0, n=2, size=32)
    names = nets.leaf_names(net, op="ReLU") + ("features", "classifier.3")
    y = torch.tensor([3, 7])
    loss = lambda logits: layers.cross_entropy(logits, y)        # noqa: E731
    out = nets.capture_grads(net, params, state, x, loss, names=lambda n, layer: n in names)
    *_, ref_acts, ref_grads = hooked_reference(model_b_module().to(D), params, state, x, names,
                                                train=False, backward=loss)
    assert set(out.activations) == set(names)
    assert_trees_close(out.activations, {k: ref_acts[k] for k in out.activations}, **TOL)
    assert_trees_close(out.grads, {k: ref_grads[k] for k in out.grads}, **TOL)


@settings(max_examples=8)
@given(names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_capture_in_training_draws_the_masks_of_apply_and_each_activation_is_its_prefix_output(names, seed):
    net = tiny_net(p=0.5)
    params, state = trees(net, seed)
    x, key = x_of(seed), jr.key(seed)
    logits, new_state, acts = nets.capture(net, params, state, x, names=names, train=True, key=key)
    apply_logits, apply_state = net.apply(params, state, x, train=True, key=key)
    assert torch.equal(logits, apply_logits)
    for k in apply_state:
        assert torch.equal(new_state[k], apply_state[k]), k
    for name, a in acts.items():
        prefix = nets.cut(net, upto=name)
        expect, _ = prefix.apply({k: params[k] for k in prefix.layer.param_shapes},
                                 {k: state[k] for k in prefix.layer.state_shapes}, x, train=True, key=key)
        assert torch.equal(a, expect), name


def test_capture_grads_under_explicit_formulations_equals_fast():
    """The written-out backward passes (impl="explicit") give the same activation gradients."""
    net = tiny_net(p=0.3)
    params, state = trees(net, 5)
    x, key, y = x_of(5), jr.key(5), torch.tensor([0, 2, 1])
    loss = lambda logits: layers.cross_entropy(logits, y, label_smoothing=0.1)   # noqa: E731
    fast = nets.capture_grads(net, params, state, x, loss, names=NAMES, train=True, key=key)
    with layers.default_impl("explicit"):
        explicit = nets.capture_grads(net, params, state, x, loss, names=NAMES, train=True, key=key)
    torch.testing.assert_close(explicit.loss, fast.loss, **TOL)
    assert_trees_close(explicit.activations, fast.activations, **TOL)
    assert_trees_close(explicit.grads, fast.grads, **TOL)


def test_capture_works_under_grad_and_vjp():
    net = tiny_net()
    params, state = trees(net, 1)
    x = x_of(1)

    def feature_energy(params):
        _, _, acts = nets.capture(net, params, state, x, names=["features.6"], train=True)
        return acts["features.6"].square().sum()

    g = torch.func.grad(feature_energy)(params)
    part = nets.cut(net, upto="features.6")

    def through_prefix(params):
        h, _ = part.apply({k: params[k] for k in part.layer.param_shapes},
                          {k: state[k] for k in part.layer.state_shapes}, x, train=True)
        return h.square().sum()

    expect = torch.func.grad(through_prefix)(params)
    assert_trees_close({k: g[k] for k in expect}, expect, **TOL)
    assert all(torch.count_nonzero(g[k]) == 0 for k in g if k not in expect)   # later layers: no say

    # vjp with respect to the input, cotangents on the logits and on an activation.
    def f(x):
        logits, _, acts = nets.capture(net, params, state, x, names=["features.3"], train=False)
        return logits, acts["features.3"]

    (logits, act), pullback = torch.func.vjp(f, x)
    cot_logits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=D)
    cot_act = torch.randn(act.shape, generator=torch.Generator().manual_seed(3), dtype=D)
    ref_x = x.clone().requires_grad_(True)
    module = tiny_module().eval()
    hooked = {}
    module.features[3].register_forward_hook(lambda m, i, o: hooked.__setitem__("a", o))
    out = functional_call(module, {**params, **{k: v.clone() for k, v in state.items()}}, (ref_x,))
    ((out * cot_logits).sum() + (hooked["a"] * cot_act).sum()).backward()
    torch.testing.assert_close(pullback((cot_logits, cot_act))[0], ref_x.grad, **TOL)


def test_capture_and_capture_grads_under_vmap_give_per_sample_results():
    net = tiny_net()
    params, state = trees(net, 2)
    x, y = x_of(2, n=4), torch.tensor([0, 1, 2, 1])
    names = ["features.2", "classifier"]

    def one(xi, yi):
        out = nets.capture_grads(net, params, state, xi[None], lambda z: layers.cross_entropy(z, yi[None]),
                                 names=names)
        return out.activations, out.grads

    acts, grads = torch.func.vmap(one)(x, y)
    # In eval the samples do not interact, so the batch with a summed loss gives the same.
    whole = nets.capture_grads(net, params, state, x,
                               lambda z: layers.cross_entropy(z, y, reduction="sum"), names=names)
    for k in names:
        torch.testing.assert_close(acts[k][:, 0], whole.activations[k], **TOL)
        torch.testing.assert_close(grads[k][:, 0], whole.grads[k], **TOL)


def test_capture_leaves_its_arguments_unchanged():
    net = tiny_net(p=0.5)
    params, state = trees(net, 3)
    x, key = x_of(3), jr.key(3)
    before = [t.clone() for t in (*params.values(), *state.values(), x, key)]
    versions = [t._version for t in (*params.values(), *state.values(), x, key)]
    nets.capture(net, params, state, x, names=NAMES, train=True, key=key)
    nets.capture_grads(net, params, state, x, lambda z: z.sum(), names=NAMES, train=True, key=key)
    after = [*params.values(), *state.values(), x, key]
    assert [t._version for t in after] == versions
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_unknown_names_are_refused_with_the_valid_ones():
    net = tiny_net()
    params, state = trees(net, 0)
    with pytest.raises(ValueError, match=r"capture: unknown layer names \['features.9', 'head'\] for "
                                         r"tiny; the valid names are \['features', 'features.0', .*"
                                         r"'classifier.3'\]"):
        nets.capture(net, params, state, x_of(0), names=["features.2", "features.9", "head"])
    with pytest.raises(ValueError, match=r"capture_grads: unknown layer names \['features.9'\]"):
        nets.capture_grads(net, params, state, x_of(0), lambda z: z.sum(), names="features.9")
    with pytest.raises(ValueError, match=r"capture: expected the predicate to select some layer of "
                                         r"tiny, it selected none; the layers are \['features', "):
        nets.capture(net, params, state, x_of(0), names=lambda name, layer: layer.op == "Relu")
    with pytest.raises(TypeError, match=r"capture: expected names to be a torch layer name, a list "
                                        r"of them or a predicate"):
        nets.capture(net, params, state, x_of(0), names=[2])


def test_capture_refuses_what_apply_refuses_and_bad_probes_and_losses():
    net = tiny_net(p=0.5)
    params, state = trees(net, 0)
    x = x_of(0)
    with pytest.raises(ValueError, match=r"capture: expected a random key \(layers.random.key\) for "
                                         r"the dropout layers \['features.4', 'classifier.2'\] of tiny"):
        nets.capture(net, params, state, x, names="features", train=True)
    missing = dict(params)
    del missing["features.0.bias"]
    with pytest.raises(ValueError, match=r"capture: expected params with the 9 keys of init, got 8 "
                                         r"keys \(missing \['features.0.bias'\]"):
        nets.capture(net, missing, state, x, names="features")
    with pytest.raises(ValueError, match=r"capture: expected probes as a dict keyed by captured names "
                                         r"\['features'\], got \['classifier'\]"):
        nets.capture(net, params, state, x, names="features", probes={"classifier": torch.zeros(())})
    with pytest.raises(ValueError, match=r"capture_grads: expected loss\(logits\) to return a scalar "
                                         r"tensor, got \(3, 3\)"):
        nets.capture_grads(net, params, state, x, lambda z: z, names="features")
