"""experiments.report.plots: the curves' epoch axis has whole-number ticks (a 1-epoch run too),
and plot_run draws what the trainer's epochs hand it: curves (an ensemble's member means) and
the confusion matrix of test, else val."""
from types import SimpleNamespace

import pytest
import torch

from experiments.cifar.config import CifarConfig
from experiments.report import plots
from experiments.train.lifecycle import Run


@pytest.fixture
def drawn(monkeypatch):
    """Each figure saved, as ``{file name: [(title, x ticks shown, x limits), ...per axes]}``."""
    figures = {}
    save = plots.save_figure

    def record(fig, path, **kwargs):
        figures[path.name] = [(ax.get_title(), [t for t in ax.get_xticks()
                                                if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]],
                               ax.get_xlim()) for ax in fig.axes]
        return save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "save_figure", record)
    return figures


def _rows(epochs, members=None):
    value = (lambda v: [v] * members) if members else (lambda v: v)
    return [{"epoch": e, "train_loss": value(2.0 / e), "train_accuracy": value(0.1 * e),
             "val_loss": None, "val_accuracy": None, "test_loss": value(2.1 / e),
             "test_accuracy": value(0.09 * e)} for e in range(1, epochs + 1)]


@pytest.mark.parametrize("epochs", [1, 2, 5, 40])
def test_epoch_ticks_are_whole_numbers_for_any_run_length(drawn, tmp_path, epochs):
    plots.plot_curves(_rows(epochs), tmp_path)
    for name in ("accuracy.png", "loss.png"):
        (_, ticks, (low, high)), = drawn[name]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        if epochs <= 5:
            assert ticks == list(range(1, epochs + 1))
        assert low <= 1 and high >= epochs


def test_plot_run_draws_the_curves_and_the_confusion_of_test_else_val(drawn, tmp_path):
    run = Run(tmp_path / "r", CifarConfig(name="r"), resumed=False, command="python -m x")
    confusion = torch.eye(3, dtype=torch.int64) * 2
    written = plots.plot_run(run, _rows(1), {"val": SimpleNamespace(confusion=confusion)}, ("a", "b", "c"))
    assert [p.name for p in written] == ["accuracy.png", "loss.png", "confusion.png"]
    assert drawn["accuracy.png"][0][0] == "r accuracy"
    assert drawn["confusion.png"][0][0] == "val, epoch 1 (accuracy 100.00%)"
    plots.plot_run(run, _rows(2), {"val": SimpleNamespace(confusion=confusion),
                                   "test": SimpleNamespace(confusion=confusion * 0 + 1)}, ("a", "b", "c"))
    assert drawn["confusion.png"][0][0] == "test, epoch 2 (accuracy 33.33%)"


def test_plot_run_of_an_ensemble_draws_the_member_means_and_no_confusion(drawn, tmp_path):
    run = Run(tmp_path / "s", CifarConfig(name="s"), resumed=False, command="python -m x")
    rows = _rows(2, members=3)
    rows[-1]["test_accuracy"] = [0.5, None, 0.3]               # a diverged member: the others' mean
    written = plots.plot_run(run, rows, {}, ("a", "b"))
    assert [p.name for p in written] == ["accuracy.png", "loss.png"]
    assert drawn["accuracy.png"][0][0] == "s (mean over the members) accuracy"
    assert not (tmp_path / "s" / "confusion.png").exists()
