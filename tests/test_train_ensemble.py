"""Ensembles in the trainer: K members trained by one vmapped step equal K separate runs, a
diverging member is frozen without touching the others, and the ensemble resumes bit for bit."""
import io
import json
import math
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from torch.utils import _pytree as pytree

import layers
import nets
import optim
from experiments import train as trainer
from experiments.data.augment import augment_batch, normalize
from experiments.data.dataset import Dataset
from experiments.train.settings import EnsembleSettings, TrainSettings
from nets.compose import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, as_net, serial

F64 = torch.float64


def tiny_net(classes=3):
    """conv - BN - ReLU - conv - pool - dropout - linear: state, randomness, both kinds of layer,
    and both ways vmap runs a convolution (the shared input batch; each member's own input)."""
    return as_net(serial(features=serial(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(),
                                         Conv2d(4, 4, 3, padding=1), MaxPool2d(2), Dropout(0.25)),
                         classifier=serial(Flatten(), Linear(4 * 4 * 4, classes))), name="tiny")


def tiny_data(seed, n=36, classes=3, side=8):
    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8),
                   torch.arange(n) % classes, tuple(f"c{i}" for i in range(classes)))


@dataclass(frozen=True)
class EnsembleRun(EnsembleSettings, TrainSettings):
    """The trainer's settings of a test run: one model (``seeds`` None) or an ensemble."""


CFG = EnsembleRun(epochs=2, batch_size=12, device="cpu", eval_batch_size=16, name="ens")
MAKE = staticmethod(lambda lr, momentum: optim.sgd(lr, momentum=momentum, nesterov=True))
AUGMENT = partial(augment_batch, crop=2, flip=True, dtype=F64)
PREPARE = partial(normalize, dtype=F64)


def _single(seed, lr, momentum, member_data_order=True, **kw):
    net = tiny_net()
    keys = trainer.run_keys(seed)
    params, state = net.init(keys.init, dtype=F64)
    cfg = CFG.replace(seed=seed)
    return trainer.fit(cfg, net=net, opt=optim.sgd(lr, momentum=momentum, nesterov=True),
                       loss_fn=layers.cross_entropy, train=tiny_data(0), test=tiny_data(1, n=12),
                       augment=AUGMENT, prepare=PREPARE, params=params, state=state,
                       quiet=True, **kw)


def _ensemble(seeds, lrs, moms, member_data_order=True, run_dir=None, resume=False, **kw):
    net_k, opt_k, loss_k = trainer.ensemble_parts(tiny_net(), lambda lr, momentum: optim.sgd(
        lr, momentum=momentum, nesterov=True), {"lr": lrs, "momentum": moms}, layers.cross_entropy)
    init_keys = torch.stack([trainer.run_keys(s).init for s in seeds])
    params, state = net_k.init(init_keys, dtype=F64)
    cfg = CFG.replace(seeds=tuple(seeds), member_data_order=member_data_order)
    run = (None if run_dir is None
           else trainer.open_run(run_dir, cfg, command="python -m tests.ensemble", resume=resume))
    return trainer.fit(cfg, net=net_k, opt=opt_k, loss_fn=loss_k, train=tiny_data(0),
                       test=tiny_data(1, n=12), augment=AUGMENT, prepare=PREPARE, params=params,
                       state=state, run=run, stream=io.StringIO(), **kw)


def test_members_equal_separate_runs_with_their_seeds_and_hyperparameters():
    seeds, lrs, moms = [3, 4, 5], [0.05, 0.01, 0.1], [0.9, 0.5, 0.8]
    ens = _ensemble(seeds, lrs, moms)
    for k, (s, lr, m) in enumerate(zip(seeds, lrs, moms)):
        one = _single(s, lr, m)
        for name, v in one.params.items():
            # float64; vmap runs the first convolution of the members as one with K times the
            # output channels, whose reductions may sum in another order than a single
            # convolution's: 6 steps of SGD move such 1e-16 differences to ~1e-13 at most
            torch.testing.assert_close(ens.params[name][k], v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.tensor(ens.history[-1]["train_loss"][k], dtype=F64),
                                   torch.tensor(one.history[-1]["train_loss"], dtype=F64),
                                   rtol=1e-10, atol=1e-12)
        assert ens.history[-1]["test_accuracy"][k] == one.history[-1]["test_accuracy"]


def test_an_ensemble_of_one_is_the_single_run_bit_for_bit():
    ens, one = _ensemble([3], [0.05], [0.9]), _single(3, 0.05, 0.9)
    for name, v in one.params.items():
        assert torch.equal(ens.params[name][0], v), name
    assert ens.history[-1]["train_loss"][0] == one.history[-1]["train_loss"]


def test_a_diverging_member_is_frozen_and_leaves_the_others_bit_identical():
    seeds = [1, 2, 3]
    good = _ensemble(seeds, [0.05, 0.02, 0.01], [0.9, 0.9, 0.9])
    bad = _ensemble(seeds, [0.05, 1e30, 0.01], [0.9, 0.9, 0.9])
    assert bad.history[-1]["diverged"] == [False, True, False]
    assert good.history[-1]["diverged"] == [False, False, False]
    for name in good.params:
        for k in (0, 2):
            assert torch.equal(good.params[name][k], bad.params[name][k]), name
        assert torch.isfinite(bad.params[name][1]).all()      # frozen at its last finite values


def test_shared_data_order_is_member_ones_and_members_still_differ_by_their_keys():
    ens = _ensemble([7, 8], [0.05, 0.05], [0.9, 0.9], member_data_order=False)
    one = _single(7, 0.05, 0.9)
    for name, v in one.params.items():
        torch.testing.assert_close(ens.params[name][0], v, rtol=1e-10, atol=1e-12)
    assert not torch.equal(ens.params["classifier.1.weight"][0], ens.params["classifier.1.weight"][1])


def test_ensemble_resume_is_bit_identical_and_history_has_a_value_per_member(tmp_path):
    seeds, lrs, moms = [1, 2], [0.05, 0.02], [0.9, 0.8]
    full = _ensemble(seeds, lrs, moms, run_dir=tmp_path / "full")
    _ensemble(seeds, lrs, moms, run_dir=tmp_path / "part", max_epochs=1)
    resumed = _ensemble(seeds, lrs, moms, run_dir=tmp_path / "part", resume=True)
    for a, b in zip(pytree.tree_leaves((full.params, full.state, full.opt_state)),
                    pytree.tree_leaves((resumed.params, resumed.state, resumed.opt_state))):
        assert torch.equal(a, b)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["test_accuracy"]) == 2 and rows[0]["diverged"] == [False, False]
    assert all(math.isfinite(v) for v in rows[-1]["train_loss"])


def test_all_members_diverging_ends_the_run():
    with pytest.raises(trainer.NonFiniteLossError):
        _ensemble([1, 2], [1e30, 1e30], [0.9, 0.9])


def test_stack_and_unstack_are_inverse_and_refuse_mismatches():
    a, b = tiny_net().init(trainer.run_keys(0).init)[0], tiny_net().init(trainer.run_keys(1).init)[0]
    back = nets.unstack(nets.stack([a, b]))
    assert all(torch.equal(back[0][k], a[k]) and torch.equal(back[1][k], b[k]) for k in a)
    with pytest.raises(ValueError, match="one structure"):
        nets.stack([a, {"x": torch.zeros(1)}])
    with pytest.raises(ValueError, match="expected 1 to"):
        trainer.ensemble_parts(tiny_net(), optim.sgd, {"lr": [0.1] * (trainer.MAX_MEMBERS + 1)},
                               layers.cross_entropy)


def test_an_ensemble_steps_under_bf16_autocast_and_channels_last():
    net_k, opt_k, loss_k = trainer.ensemble_parts(tiny_net(), lambda lr: optim.sgd(lr), {"lr": [0.1, 0.01]},
                                                  layers.cross_entropy)
    keys = torch.stack([layers.random.key(0), layers.random.key(1)])
    params, state = net_k.init(keys)
    step = trainer.make_step(net_k, opt_k, loss_k, bf16=True, channels_last=True)
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 3
    params, state, opt_state, metrics = step(params, state, opt_k.init(params), (x, y), keys)
    assert metrics["loss"].shape == (2,) and torch.isfinite(metrics["loss"]).all()


def test_the_ensemble_step_compiled_apply_traces_as_one_graph_and_equals_eager():
    # torch.compile of the whole step, the vmapped optimizer inside: the functorch introspection
    # (optim.base.is_traced, layers._members.is_batched) and the divergence test's host read
    # must not break the graph (fullgraph: a break is an error). aot_eager runs the traced
    # graph without inductor; torch's batching rules replace the member rules there, so the
    # members agree with the eager step up to float64 reassociation.
    net_k, opt_k, loss_k = trainer.ensemble_parts(
        tiny_net(), lambda lr, momentum: optim.sgd(lr, momentum=momentum, nesterov=True),
        {"lr": [0.05, 0.01], "momentum": [0.9, 0.5]}, layers.cross_entropy, flat=True)
    keys = torch.stack([trainer.run_keys(s).init for s in (1, 2)])
    params, state = net_k.init(keys, dtype=F64)
    opt_state = opt_k.init(params)
    data = tiny_data(0, n=12)
    batch = (PREPARE(data.images), data.labels)
    step = trainer.make_step(net_k, opt_k, loss_k)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(params, state, opt_state, batch, torch.stack([layers.random.key(7), layers.random.key(8)]))
    want = step(params, state, opt_state, batch, torch.stack([layers.random.key(7), layers.random.key(8)]))
    for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(want)):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        else:
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
