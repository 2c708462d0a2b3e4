"""experiments.transfer.feature_cache: cutting a net (prefix + suffix == the net, keys replayed), the
hashed on-disk cache (computed once, keyed by content, damaged files recomputed), the training
loop and the scores.

Nets here are tiny (a few hundred parameters) and float64, so equalities are exact or within
a few ulps; the VGG16-scale checks are in tests/test_transfer_caltech.py.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layers
import nets
import optim
from experiments import train as trainer
from experiments.transfer import feature_cache as fc
from layers import random as jr
from nets.compose import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear,
                          MaxPool2d, ReLU, as_net, serial)

SEEDS = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: with 2 OpenMP threads on a shared 2-core CPU each op spin-waits (~20x
    slower); the previous setting is restored for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_net(dropout=0.5):
    """A VGG-shaped net with batch norm and dropout in both halves, so that a wrong key split or
    a train/eval mix-up shows."""
    return as_net(serial(
        features=serial(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2),
                        Dropout(dropout), Conv2d(4, 6, 3, padding=1), ReLU(), MaxPool2d(2)),
        avgpool=AdaptiveAvgPool2d(2), flatten=Flatten(),
        classifier=serial(Linear(24, 10), ReLU(), Dropout(dropout), Linear(10, 3))), name="tiny")


def _init(net, seed):
    params, state = net.init(jr.key(seed), dtype=torch.float64)
    # running statistics away from (0, 1), so that eval mode visibly uses them
    state = {k: (v + 0.3 if k.endswith("running_mean") else v * 1.7 if k.endswith("running_var") else v)
             for k, v in state.items()}
    return params, state


def _images(seed, n=4, side=8):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def plain_net():
    """tiny_net without batch norm and dropout in the features: train == eval before the head."""
    return as_net(serial(
        features=serial(Conv2d(3, 4, 3, padding=1), ReLU(), MaxPool2d(2),
                        Conv2d(4, 6, 3, padding=1), ReLU(), MaxPool2d(2)),
        avgpool=AdaptiveAvgPool2d(2), flatten=Flatten(),
        classifier=serial(Linear(24, 10), ReLU(), Dropout(0.5), Linear(10, 3))), name="plain")


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS, cut=st.sampled_from(["features.5", "flatten", "classifier.1"]))
def test_suffix_on_cached_prefix_equals_train_mode_net_when_the_prefix_is_train_eval_invariant(seed, cut):
    # The cached path must reproduce net.apply(train=True) exactly, suffix dropout mask included.
    net = plain_net()
    params, state = net.init(jr.key(seed), dtype=torch.float64)
    x, key = _images(seed), jr.key(seed + 1)
    h = fc.prefix_apply(net, cut)(params, state, x)
    trained = {k: v for k, v in params.items() if k.startswith("classifier.3")}
    frozen = {k: v for k, v in params.items() if k not in trained}
    y, _ = fc.suffix_net(net, cut, frozen).apply(trained, {}, h, train=True, key=key)
    y_ref, _ = net.apply(params, state, x, train=True, key=key)
    assert torch.equal(y, y_ref)


@settings(deadline=None, max_examples=8)
@given(seed=SEEDS)
def test_prefix_runs_in_eval_mode_and_suffix_with_the_whole_nets_keys(seed):
    # With batch norm and dropout in the prefix, the cached path equals a net whose prefix is
    # in eval mode and whose suffix is in train mode with the whole net's keys.
    net = tiny_net()
    params, state = _init(net, seed)
    x, key = _images(seed), jr.key(seed + 1)
    h = fc.prefix_apply(net, "flatten")(params, state, x)
    head = fc.suffix_net(net, "flatten")
    y, _ = head.apply({k: v for k, v in params.items() if k.startswith("classifier")}, {}, h,
                      train=True, key=key)
    names = nets.leaf_names(net)
    prefix = nets.cut(net, upto="flatten")
    h_ref = prefix.apply({k: params[k] for k in prefix.layer.param_shapes},
                         {k: state[k] for k in prefix.layer.state_shapes}, x, train=False)[0]
    keys = nets.leaf_keys(net, key)
    mask_layer = nets.leaves(net.layer)[names.index("classifier.2")][1]
    z = layers.relu(layers.linear({"weight": params["classifier.0.weight"],
                                   "bias": params["classifier.0.bias"]}, h_ref))
    z, _ = mask_layer.apply({}, {}, z, train=True, key=keys["classifier.2"])
    y_ref = layers.linear({"weight": params["classifier.3.weight"],
                           "bias": params["classifier.3.bias"]}, z)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_leaf_keys_are_distinct_and_none_in_eval():
    net = tiny_net()
    keys = nets.leaf_keys(net, jr.key(0))
    assert list(keys) == list(nets.leaf_names(net))
    stacked = torch.stack(list(keys.values()))
    assert len({tuple(k.tolist()) for k in stacked}) == len(keys)
    assert all(v is None for v in nets.leaf_keys(net, None).values())


def test_cut_at_an_unknown_layer_names_the_layers():
    with pytest.raises(ValueError, match=r"cut: expected the torch name of a layer of tiny, got 'nope'"):
        fc.prefix_apply(tiny_net(), "nope")
    head = fc.suffix_net(tiny_net(), "flatten")
    with pytest.raises(ValueError, match="missing"):
        head.apply({}, {}, torch.zeros(1, 24), train=False)
    with pytest.raises(ValueError, match="expected a random key"):
        head.apply({"classifier.0.weight": torch.zeros(10, 24), "classifier.0.bias": torch.zeros(10),
                    "classifier.3.weight": torch.zeros(3, 10), "classifier.3.bias": torch.zeros(3)},
                   {}, torch.zeros(1, 24), train=True)


# ------------------------------------------------------------------------------------------ cache

def test_cached_computes_once_then_reads_the_same_tensors(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"features": torch.arange(12.0).reshape(3, 4), "labels": torch.tensor([0, 1, 2])}
    key = fc.cache_key(weights="w", data="d")
    a = fc.cached(tmp_path, "x", key, compute)
    b = fc.cached(tmp_path, "x", key, compute)
    assert len(calls) == 1
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in tmp_path.iterdir()] == [f"x-{key[:24]}.safetensors"]  # no temp left


def test_cached_recomputes_a_damaged_file_and_a_new_key_makes_a_new_file(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"features": torch.ones(2, 2)}
    key = fc.cache_key(a=1)
    fc.cached(tmp_path, "x", key, compute)
    path = tmp_path / f"x-{key[:24]}.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    out = fc.cached(tmp_path, "x", key, compute)
    assert len(calls) == 2 and torch.equal(out["features"], torch.ones(2, 2))
    fc.cached(tmp_path, "x", fc.cache_key(a=2), compute)
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 2


def test_tree_digest_changes_with_any_value_name_dtype_or_shape():
    base = {"a": torch.arange(6.0), "b": torch.tensor(3)}
    d = fc.tree_digest(base)
    assert d == fc.tree_digest({"b": torch.tensor(3), "a": torch.arange(6.0)})  # order-free
    changed = [
        {"a": torch.arange(6.0).index_fill(0, torch.tensor([5]), 5.000001), "b": torch.tensor(3)},
        {"c": torch.arange(6.0), "b": torch.tensor(3)},
        {"a": torch.arange(6.0).double(), "b": torch.tensor(3)},
        {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(3)},
    ]
    assert len({d, *(fc.tree_digest(t) for t in changed)}) == 5


# ------------------------------------------------------------------------------ training, scores

@settings(deadline=None, max_examples=3)
@given(seed=SEEDS)
def test_fit_tensors_is_a_function_of_its_key_and_learns_a_separable_problem(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    net = as_net(serial(Linear(5, 2)), name="probe")
    p0, _ = net.init(jr.key(seed), dtype=torch.float64)
    run = lambda: trainer.fit_tensors(net, optim.sgd(0.5), x, y, params=p0, state={},  # noqa: E731
                                      epochs=15, batch_size=8, key=jr.key(seed))
    r1, r2 = run(), run()
    p1, p2, hist = r1.params, r2.params, r1.history
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert hist[-1]["train_accuracy"] >= 0.9 and len(hist) == 15


def test_fit_tensors_rejects_mismatched_data():
    net = as_net(serial(Linear(2, 2)), name="probe")
    p, _ = net.init(jr.key(0))
    with pytest.raises(ValueError, match="fit_tensors: expected as many inputs as labels"):
        trainer.fit_tensors(net, optim.sgd(0.1), torch.zeros(3, 2), torch.zeros(2).long(),
                            params=p, epochs=1, batch_size=2, key=jr.key(0))


def test_scores_give_accuracy_and_mean_per_class_recall():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 2, 1])
    s = trainer.scores(torch.nn.functional.one_hot(pred, 3).double(), labels, 3)
    assert s.accuracy == pytest.approx(6 / 8)
    assert s.mean_recall == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_standardize_uses_the_training_statistics():
    tr = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    te = torch.tensor([[2.0, 20.0]])
    a, b = fc.standardize(tr, te)
    torch.testing.assert_close(a.mean(0), torch.zeros(2))
    torch.testing.assert_close(b, torch.zeros(1, 2))
    assert math.isclose(a.std(0)[0].item(), 1.0, rel_tol=1e-6)
