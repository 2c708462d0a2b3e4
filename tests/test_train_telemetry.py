"""Telemetry while training: per-layer statistics every N steps, computed apart from the step
(a run with telemetry trains exactly the parameters of one without), kept across a resume."""
import dataclasses
import io
import json
from functools import partial

import pytest
import torch
from torch.utils import _pytree as pytree

import layers
import optim
from experiments import train as trainer
from experiments.train.settings import EnsembleSettings, TrainSettings
from experiments.data.augment import augment_batch, normalize
from experiments.data.dataset import Dataset
from experiments.train.telemetry import layer_stats, watched
from nets.compose import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, as_net, serial


def tiny_net():
    return as_net(serial(features=serial(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(),
                                         MaxPool2d(2), Dropout(0.25)),
                         classifier=serial(Flatten(), Linear(4 * 4 * 4, 3))), name="tiny")


def tiny_data(seed, n=36):
    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8),
                   torch.arange(n) % 3, ("a", "b", "c"))


def _fit(run_dir=None, resume=False, max_epochs=None, **cfg):
    config = TrainSettings(**dict(dict(seed=1, epochs=2, batch_size=12, device="cpu", name="t"), **cfg))
    run = None if run_dir is None else trainer.open_run(run_dir, config, command="t", resume=resume)
    return trainer.fit(config, net=tiny_net(), opt=optim.sgd(0.05, momentum=0.9),
                       loss_fn=layers.cross_entropy, train=tiny_data(0), test=tiny_data(1, n=12),
                       augment=partial(augment_batch, crop=2), prepare=normalize, run=run,
                       stream=io.StringIO(), max_epochs=max_epochs)


def test_telemetry_observes_without_changing_the_training():
    plain, watched_run = _fit(), _fit(telemetry=2)
    for a, b in zip(pytree.tree_leaves((plain.params, plain.state, plain.opt_state)),
                    pytree.tree_leaves((watched_run.params, watched_run.state, watched_run.opt_state))):
        assert torch.equal(a, b)
    rows = watched_run.telemetry
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 0), (1, 2), (2, 1)]   # global steps 0, 2, 4
    first = rows[0]["layers"]
    assert list(first) == watched(tiny_net()) == ["features.0", "features.1", "features.2",
                                                 "classifier.1"]
    assert 0 <= first["features.2"]["zero_frac"] <= 1 and first["features.0"]["grad_w_norm"] > 0
    assert first["features.0"]["update_ratio"] > 0 and "bn_drift_mean" in rows[1]["layers"]["features.1"]


def test_layer_stats_equal_autograd_through_the_net():
    net = tiny_net()
    params, state = net.init(trainer.run_keys(0).init)
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1])
    key = trainer.run_keys(0).train
    stats = layer_stats(net, params, state, x, y, layers.cross_entropy, key)
    # the weight gradient norm is plain autograd's through net.apply (capture cuts the net into
    # parts, which may sum the same float32 products in another order: a few ulps)
    g = torch.func.grad(lambda p: layers.cross_entropy(
        net.apply(p, state, x, train=True, key=key)[0], y))(params)
    assert stats["classifier.1"]["grad_w_norm"] == pytest.approx(
        float(torch.linalg.vector_norm(g["classifier.1.weight"])), rel=1e-6)


def test_telemetry_rows_survive_a_resume_and_land_in_the_run_folder(tmp_path):
    full = _fit(tmp_path / "full", telemetry=2)
    part = _fit(tmp_path / "part", max_epochs=1, telemetry=2)
    assert part.status == "stopped"
    resumed = _fit(tmp_path / "part", resume=True, telemetry=2)
    rows = [json.loads(x) for x in (tmp_path / "part" / "telemetry.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows] == [(r["epoch"], r["step"]) for r in full.telemetry]
    assert len(resumed.telemetry) == 3


def test_telemetry_is_refused_for_an_ensemble_and_a_bad_interval():
    @dataclasses.dataclass(frozen=True)
    class Ensemble(EnsembleSettings, TrainSettings):
        pass

    with pytest.raises(ValueError, match="--telemetry"):
        TrainSettings(epochs=1, batch_size=1, telemetry=0.5)
    with pytest.raises(ValueError, match="ensemble"):
        Ensemble(epochs=1, batch_size=1, telemetry=5, seeds=[0, 1])
