"""experiments.cifar_transfer: the class split, the per-class few-shot draws, small_vgg16's block
shapes, the table, and a smoke run of the whole study on a small CIFAR-10 subset (skipped when
CIFAR10_DIR is unset) that is rerun to check it resumes instead of recomputing."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nets
from experiments import cifar_transfer as ctr_cli
from experiments.common.settings import Difference
from experiments.transfer import cifar_split as ctr
from experiments.transfer.config import (FEATURES, CifarTransferStudy, check_output,
                                         open_output)
from experiments.data.cifar10 import CIFAR10_CLASSES
from experiments.data.dataset import Dataset
from layers import random as jr

SEEDS = st.integers(0, 2**31 - 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_by_class_keeps_only_the_halfs_images_relabelled_in_order():
    labels = torch.tensor([0, 5, 9, 4, 6, 1, 5])
    data = Dataset(torch.arange(7).reshape(7, 1, 1, 1).to(torch.uint8), labels, CIFAR10_CLASSES)
    b = ctr.split_by_class(data, ctr.CLASSES_B)
    assert b.classes == ("dog", "frog", "horse", "ship", "truck")
    assert b.labels.tolist() == [0, 4, 1, 0] and b.images.flatten().tolist() == [1, 2, 4, 6]
    a = ctr.split_by_class(data, ctr.CLASSES_A)
    assert a.labels.tolist() == [0, 4, 1] and not set(a.images.flatten().tolist()) & {1, 2, 4, 6}
    with pytest.raises(ValueError, match="split_by_class: expected classes among"):
        ctr.split_by_class(data, ("unicorn",))


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS, n=st.integers(1, 12))
def test_draws_take_n_per_class_deterministically_and_nest_across_sizes(seed, n):
    labels = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(seed))
    labels[:60] = torch.arange(60) % 5            # at least 12 of each class
    idx = ctr.draw_per_class(labels, n, seed, 5)
    assert torch.bincount(labels[idx], minlength=5).tolist() == [n] * 5
    assert torch.equal(idx, ctr.draw_per_class(labels, n, seed, 5))
    assert set(idx.tolist()) <= set(ctr.draw_per_class(labels, 12, seed, 5).tolist())


def test_a_class_with_too_few_images_is_an_error():
    with pytest.raises(ValueError, match="draw_per_class: expected at least 3 images of class 1, got 2"):
        ctr.draw_per_class(torch.tensor([0, 0, 0, 1, 1]), 3, 0, 2)


def test_small_vgg16_has_vgg16s_layout_at_a_quarter_width():
    net = nets.small_vgg16(5)
    params, state = net.init(jr.key(0))
    convs = [k for k, v in params.items() if v.dim() == 4]
    assert len(convs) == 13                                     # 2 + 2 + 3 + 3 + 3, as VGG16
    outs = ctr.block_features(net, params, state, torch.zeros(2, 3, 32, 32))
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2),
                                                 (128, 1, 1)]
    s = nets.summary(net, (1, 3, 32, 32), show=False)
    assert s.output_shape == (1, 5)


def test_table_shows_mean_and_std_over_draws():
    results = {"_pretrained": "x",
               "n32-d0-scratch": {"accuracy": 0.5, "train_accuracy": 1.0},
               "n32-d1-scratch": {"accuracy": 0.7, "train_accuracy": 1.0},
               "n500-d0-scratch": {"accuracy": 0.8, "train_accuracy": 0.9}}
    table = ctr.format_table(results, (32, 500), ("scratch", "fine-tune"))
    lines = table.splitlines()
    assert lines[2] == "| scratch | 60.00 ± 14.14 | 100.00 ± 0.00 | 80.00 | 90.00 |"
    assert lines[3] == "| fine-tune | - | - | - | - |"


@pytest.mark.skipif(not os.environ.get("CIFAR10_DIR"), reason="CIFAR10_DIR is not set")
def test_smoke_run_on_a_subset_fills_the_table_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    from experiments.data.cifar10 import find_data_dir, load_cifar10

    monkeypatch.setenv("PURENN_CACHE", str(tmp_path / "purenn"))   # leave the user's cache alone
    root = find_data_dir(download=False)
    train = load_cifar10(root, "train", limit_per_class=12, progress=False)
    test = load_cifar10(root, "test", limit_per_class=6, progress=False)
    # a smoke run: every method, a few steps each
    monkeypatch.setitem(ctr.RECIPE, "pretrain", ctr.RECIPE["pretrain"].replace(batch_size=30))
    for part in ("features", "finetune", "scratch"):
        monkeypatch.setitem(ctr.RECIPE, part, ctr.RECIPE[part].replace(epochs_by_shots={4: 2}, batch_size=8))
    monkeypatch.setitem(ctr.RECIPE, "features", ctr.RECIPE["features"].replace(hidden=16))
    study = CifarTransferStudy(shots=(4,), draws=(1,), pretrain_epochs=1,
                               feature_cache=str(tmp_path / "cache"))
    results = ctr.run_study(train, test, tmp_path / "study", study)
    cells = {k for k in results if not k.startswith("_")}
    assert cells == {f"n4-d0-{m}" for m in ctr.METHODS}
    assert all(0 <= results[c]["accuracy"] <= 1 for c in cells)
    table = (tmp_path / "study" / "table.md").read_text()
    assert all(m in table for m in ctr.METHODS)
    capsys.readouterr()
    again = ctr.run_study(train, test, tmp_path / "study", study)
    err = capsys.readouterr().err
    assert "resuming" in err and "n4-d0-" not in err          # nothing retrained
    assert again == results
    saved = json.loads((tmp_path / "study" / "results.json").read_text())
    assert saved["n4-d0-scratch"] == results["n4-d0-scratch"]


def test_help_describes_the_study(capsys):
    with pytest.raises(SystemExit) as e:
        ctr_cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--shots" in out and "--draws" in out and "frozen+new-head" in out


def test_the_table_shows_every_cell_the_folder_holds_whatever_the_flags():
    results = {"_pretrained": "x", "n500-d0-scratch": {"accuracy": 0.8, "train_accuracy": 0.9},
               "n32-d0-fine-tune": {"accuracy": 0.5, "train_accuracy": 1.0},
               "n32-d0-probe-block2": {"accuracy": 0.4, "train_accuracy": 0.6}}
    assert ctr.cells(results) == ((32, 500), ("probe-block2", "fine-tune", "scratch"))


def test_epochs_by_images_per_class_read_back_from_json():
    assert FEATURES.epochs_for(32) == 60 and FEATURES.epochs_for(500) == 20 and FEATURES.epochs_for(7) == 20
    assert type(FEATURES).from_json(json.loads(json.dumps(FEATURES.to_json()))) == FEATURES
    with pytest.raises(ValueError, match="epochs_by_shots"):
        FEATURES.replace(epochs_by_shots={32: 0})


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_rerun_with_other_settings_is_refused_in_one_line_and_the_folder_is_untouched(tmp_path, capsys):
    out = tmp_path / "study"
    open_output(out, CifarTransferStudy(limit_per_class=12, pretrain_epochs=1, data_dir="/somewhere"))
    (out / "results.json").write_text("{}")
    before = _snapshot(out)
    assert ctr_cli.main(["--out", str(out), "--limit-per-class", "20", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert f"{Difference('limit_per_class', 12, 20)}; {Difference('pretrain_epochs', 1, None)}" in err[0]
    assert _snapshot(out) == before
    # more cells, another data folder, another cache: the study continues
    check_output(out, CifarTransferStudy(limit_per_class=12, pretrain_epochs=1, shots=(4, 8),
                                         draws=(2, 1), methods=("scratch",), data_dir="/else",
                                         feature_cache="/cache"))


def test_a_study_folder_of_an_older_purenn_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    (out / "results.json").write_text('{"n32-d0-scratch": {"accuracy": 0.5}}')
    assert ctr_cli.main(["--out", str(out), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not record the settings" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_limit_per_class_0_and_mismatched_draws_are_refused_as_flags(tmp_path, capsys):
    assert ctr_cli.main(["--out", str(tmp_path / "s"), "--limit-per-class", "0"]) == 2
    assert "--limit-per-class: expected a whole number >= 1, got 0" in capsys.readouterr().err
    assert ctr_cli.main(["--out", str(tmp_path / "s"), "--shots", "4", "8", "--draws", "1"]) == 2
    assert "--draws: expected one count per --shots entry (2), got 1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
