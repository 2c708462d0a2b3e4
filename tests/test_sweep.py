"""python -m experiments.sweep: grids refused before anything runs, a sweep of a tiny grid on a
generated CIFAR folder (table, figures, per-member metrics, evaluate per member), resume and
rerun through the run lifecycle, the typed config and old run folders."""
import json
import re

import pytest

from experiments import evaluate, sweep
from experiments.common.settings import SettingsError
from experiments.ensembles.config import SweepConfig
from experiments.ensembles.grid import check_grid, members, parse_values


@pytest.fixture
def tiny_cifar(cifar_folder):
    """A 32x32 PNG image-folder CIFAR-10 with 13 train and 2 test images per class (130 train
    images: one batch of the ablation's 125)."""
    return cifar_folder(13, 2)


def _argv(tiny_cifar, tmp_path, *flags, name="s"):
    return ["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "runs"), "--name", name,
            "--batch-size", "10", "--device", "cpu", "--limit-per-class", "4", *flags]


def _snapshot(folder):
    """Every file of ``folder``: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _strict(text):
    """``json.loads`` that refuses NaN and infinities (what other JSON readers do)."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _metrics(run):
    return [_strict(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(err):
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    return lines[-1]


@pytest.mark.parametrize("flags, needle", [
    (["--lr", ""], "--lr"),
    (["--lr", "0.1,,0.2"], "--lr"),
    (["--lr", "fast"], "--lr: expected numbers, got 'fast'"),
    (["--lr", "-0.1"], "--lr: expected a finite number in (0, inf), got -0.1"),
    (["--lr", "inf"], "--lr: expected a finite number in (0, inf), got inf"),
    (["--lr", "nan"], "--lr: expected a finite number"),
    (["--lr", "1e-1,0.1"], "--lr: expected distinct values, got 0.1 more than once"),
    (["--momentum", "0.9,-1"], "--momentum"),
    (["--momentum", "0.9,0.90"], "--momentum: expected distinct values, got 0.9"),
    (["--lr", "1,2,3,4,5", "--momentum", "0.1,0.2,0.3", "--seeds", "5"], "--max-members"),
    (["--max-members", "0"], "--max-members: expected a whole number >= 1, got 0"),
    (["--seeds", "0"], "--seeds"),
    (["--epochs", "0"], "--epochs"),
    (["--limit-per-class", "0"], "--limit-per-class: expected a whole number >= 1, got 0"),
    (["--max-epochs", "0"], "--max-epochs: expected a whole number >= 1, got 0"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum"),
    (["--name", "../x"], "--name"),
])
def test_a_bad_grid_is_one_line_exit_2_and_no_run_folder(flags, needle, tmp_path, tiny_cifar, capsys):
    code = sweep.main(["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and needle in _one_error_line(err), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_a_grid_is_the_product_of_its_lists_once_per_seed():
    ms = members({"lr": [0.1, 0.01], "momentum": [0.9, 0.5]}, seeds=3, first_seed=10)
    assert len(ms) == 12 and ms[0].point == {"lr": 0.1, "momentum": 0.9} and ms[0].seed == 10
    assert [m.seed for m in ms[:3]] == [10, 11, 12] and ms[3].point == {"lr": 0.1, "momentum": 0.5}
    assert parse_values("lr", " 1e-3, 0.5 ") == [1e-3, 0.5]
    check_grid({"lr": [0.1]}, 64, 64)
    with pytest.raises(ValueError, match="--max-members: expected at most 64 members, got 65"):
        check_grid({"lr": [0.1]}, 65, 64)


def test_the_config_spells_out_one_seed_per_member_in_the_grid_order_and_round_trips():
    cfg = SweepConfig.with_members(lr=[0.1, 0.01], momentum=[0.9], seed=10, seeds_per_point=2)
    assert cfg.seeds == (10, 11, 10, 11) and cfg.seeds_per_point == 2
    assert [(m.point["lr"], m.seed) for m in cfg.members()] == [(0.1, 10), (0.1, 11), (0.01, 10), (0.01, 11)]
    assert SweepConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert cfg.net_options() == {}                                  # the tutorial net takes none
    b = cfg.replace(model="cifar_model_b", dropout=0.1)
    assert b.net_options() == {"batch_norm": True, "bn_momentum": 0.1, "bn_eps": 1e-5, "dropout": 0.1}
    with pytest.raises(SettingsError, match=r"seeds: expected seeds 10, 10 \+ 1, ... once for each of the 2 grid points .one per member., got \[10, 11, 10\]"):
        cfg.replace(seeds=(10, 11, 10))
    with pytest.raises(SettingsError, match="--schedule: expected constant"):
        cfg.replace(schedule="onecycle")


#: config.json of ``python -m experiments.sweep ... --lr 0.05,0.01 --momentum 0.9 --seeds 2`` and
#: of the ablation's "full report recipe" of Model A (``--seeds 2 --epochs 1``), as purenn wrote
#: them before the typed configs.
OLD_SWEEP = {"optimizer": "sgd", "nesterov": False, "weight_decay": 0.0, "decay_mask": False, "schedule": "constant", "label_smoothing": 0.0, "crop": 0, "flip": False, "cutout": 0, "tta_flip": False, "tta_shift": 0, "bf16": False, "channels_last": False, "compile": False, "eval_batch_size": 1000, "device": "cpu", "val_split": "0", "retain_freed_memory": True, "momentum": 0.0, "lr": 0.05, "model": "tutorial", "epochs": 1, "batch_size": 10, "limit_per_class": 4, "data_dir": "/data/c10", "test": True, "seed": 0, "grid": {"lr": [0.05, 0.01], "momentum": [0.9], "weight_decay": [0.0]}, "points": [{"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}, {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}, {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}], "seeds": [0, 1, 0, 1], "member_data_order": False, "recipe": "sweep", "name": "s"}  # noqa: E501
OLD_VARIANT = {"seed": 0, "device": "cpu", "val_split": "0", "limit_per_class": None, "eval_batch_size": 1000, "bf16": False, "channels_last": False, "compile": False, "crop": 0, "flip": True, "retain_freed_memory": True, "tta_shift": 0, "cutout": 0, "telemetry": 0, "bn_momentum": 0.1, "bn_eps": 1e-05, "lookahead": False, "lookahead_every": 5, "lookahead_decay": 0.7737809374999998, "whiten_init": False, "whiten_images": 5000, "whiten_eps": 0.0005, "optimizer": "adam", "lr": 0.001, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "decay_mask": False, "schedule": "constant", "label_smoothing": 0.0, "tta_flip": False, "epochs": 1, "batch_size": 32, "data_dir": "/data/c10", "test": True, "model": "cifar_model_a", "recipe": "sweep", "grid": {"lr": [0.001], "momentum": [0.0], "weight_decay": [0.0]}, "points": [{"lr": 0.001, "momentum": 0.0, "weight_decay": 0.0}, {"lr": 0.001, "momentum": 0.0, "weight_decay": 0.0}], "seeds": [0, 1], "name": "ablation-a/full-report-recipe"}  # noqa: E501


def test_configs_written_before_the_typed_configs_still_load_as_what_the_commands_ask_for():
    from experiments.ensembles.ablation import variant_configs
    from experiments.ensembles.config import AblationConfig

    old = SweepConfig.from_json(SweepConfig.upgrade(OLD_SWEEP))
    new = SweepConfig.with_members(lr=[0.05, 0.01], momentum=[0.9], seeds_per_point=2, epochs=1,
                                   batch_size=10, limit_per_class=4, data_dir="/data/c10",
                                   device="cpu", name="s")
    assert old == new and old.seed == 0
    study = AblationConfig(model="cifar_model_a", seeds=2, epochs=1, data_dir="/data/c10", device="cpu")
    assert SweepConfig.from_json(SweepConfig.upgrade(OLD_VARIANT)) == variant_configs(study, "ablation-a")[0][1]
    # what is not a sweep's is refused in one line that says why
    with pytest.raises(SettingsError, match="expected the config of a sweep .recipe 'sweep'., got recipe 'fast'"):
        SweepConfig.upgrade({**OLD_SWEEP, "recipe": "fast"})
    with pytest.raises(SettingsError, match="lookahead: expected False in a sweep's config, got True"):
        SweepConfig.upgrade({**OLD_VARIANT, "lookahead": True})


def test_sweep_trains_every_member_writes_its_table_and_figures_and_resumes(tmp_path, tiny_cifar, capsys):
    argv = ["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "runs"), "--name", "s",
            "--lr", "0.05,1e30", "--momentum", "0.5,0.9", "--seeds", "2", "--epochs", "2",
            "--batch-size", "10", "--device", "cpu", "--limit-per-class", "4"]
    assert sweep.main(argv + ["--max-epochs", "1"]) == 0
    run = tmp_path / "runs" / "s"
    assert not (run / "table.md").exists()                      # not finished yet
    assert sweep.main(["--resume", str(run)]) == 0
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2] and len(rows[-1]["test_accuracy"]) == 8
    assert rows[-1]["diverged"] == [False] * 4 + [True] * 4     # lr 1e30 diverges, alone
    table = (run / "table.md").read_text()
    assert "| 0.05 | 0.9 | 0 |" in table and table.count("| 2 | 0 |") == 2
    assert {"sweep_lr.png", "sweep_momentum.png", "results.json"} <= {p.name for p in run.iterdir()}


def test_evaluate_reports_each_member_of_a_sweep(tmp_path, tiny_cifar, capsys):
    run = tmp_path / "runs" / "s"
    assert sweep.main(_argv(tiny_cifar, tmp_path, "--lr", "0.05,1e30", "--momentum", "0.5,0.9",
                            "--seeds", "2", "--epochs", "1")) == 0
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(run), "--data-dir", str(tiny_cifar), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])["members"]
    assert len(report) == 8 and report[4]["diverged"] and not report[0]["diverged"]
    assert "member   7: lr 1e+30 momentum 0.9" in out
    # a paired comparison is of two single nets: an ensemble is refused in one line
    assert evaluate.main(["--checkpoint", str(run), "--data-dir", str(tiny_cifar),
                          "--against", str(run)]) == 2
    assert "--against: expected two single-net runs, got an ensemble's checkpoint" in capsys.readouterr().err


def test_resume_with_more_epochs_trains_them_and_the_table_says_so(tmp_path, tiny_cifar, capsys):
    run = tmp_path / "runs" / "s"
    assert sweep.main(_argv(tiny_cifar, tmp_path, "--lr", "0.05", "--epochs", "1")) == 0
    first = _metrics(run)
    assert "1 epoch," in (run / "table.md").read_text()
    capsys.readouterr()
    assert sweep.main(["--resume", str(run), "--epochs", "2"]) == 0
    out, err = capsys.readouterr()
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[:1] == first     # epoch 1 as it was
    assert "epoch 2/2" in err and "2 epochs," in (run / "table.md").read_text()
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed[0]["mean"] == rows[-1]["test_accuracy"][0]            # the folder's epoch 2
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "0.5"], "--lr [0.5] (the run's: [0.05])"),
    (["--seeds", "3"], "--seeds [0, 1, 2] (the run's: [0])"),
    (["--limit-per-class", "50"], "--limit-per-class 50 (the run's: 4)"),
    (["--batch-size", "20"], "--batch-size 20 (the run's: 10)"),
])
def test_resume_with_another_setting_is_refused_naming_it_and_leaves_the_folder(flags, needle, tmp_path,
                                                                                tiny_cifar, capsys):
    run = tmp_path / "runs" / "s"
    assert sweep.main(_argv(tiny_cifar, tmp_path, "--lr", "0.05", "--epochs", "1")) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert sweep.main(["--resume", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert needle in _one_error_line(err), err
    assert _snapshot(run) == before


def test_resume_with_the_flags_it_was_trained_with_is_accepted(tmp_path, tiny_cifar, capsys):
    run = tmp_path / "runs" / "s"
    assert sweep.main(_argv(tiny_cifar, tmp_path, "--lr", "0.05", "--epochs", "1")) == 0
    assert sweep.main(["--resume", str(run), "--lr", "5e-2", "--seeds", "1", "--limit-per-class", "4"]) == 0


def test_a_rerun_without_resume_is_refused(tmp_path, tiny_cifar, capsys):
    argv = _argv(tiny_cifar, tmp_path, "--lr", "0.05", "--epochs", "1")
    assert sweep.main(argv) == 0
    before = _snapshot(tmp_path / "runs" / "s")
    capsys.readouterr()
    assert sweep.main(argv) == 2
    assert "already holds a run" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(tmp_path / "runs" / "s") == before


def test_one_seed_shows_no_spread_and_a_diverged_member_stays_strict_json(tmp_path, tiny_cifar, capsys):
    run = tmp_path / "runs" / "s"
    assert sweep.main(_argv(tiny_cifar, tmp_path, "--lr", "0.05,1e30", "--epochs", "1")) == 0
    table = (run / "table.md").read_text()
    assert "± 0.00" not in table and re.search(r"\| 0\.05 \| 0 \| 0 \| \d+\.\d\d \| - \| 1 \| 0 \|", table), table
    results = _strict((run / "results.json").read_text())
    assert results["rows"][0]["std"] is None and results["rows"][1]["mean"] is None
    rows = _metrics(run)                                       # _strict refuses NaN / Infinity
    assert rows[-1]["diverged"] == [False, True]
    assert "NaN" not in (run / "metrics.jsonl").read_text() + (run / "results.json").read_text()


def test_a_damaged_metrics_file_or_config_is_one_line(tmp_path, tiny_cifar, capsys):
    run = tmp_path / "runs" / "s"
    assert sweep.main(_argv(tiny_cifar, tmp_path, "--lr", "0.05", "--epochs", "2", "--max-epochs", "1")) == 0
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(good[: len(good) // 2])
    capsys.readouterr()
    assert sweep.main(["--resume", str(run)]) == 2
    assert "metrics.jsonl: expected one JSON object per line" in _one_error_line(capsys.readouterr().err)
    # a damaged config.json: the checkpoint holds the config, and the resume writes it again
    (run / "metrics.jsonl").write_text(good)
    (run / "config.json").write_text('{"name": ')
    assert sweep.main(["--resume", str(run)]) == 0
    assert _strict((run / "config.json").read_text())["name"] == "s"


def test_resume_of_a_folder_that_holds_no_sweep_is_one_line(tmp_path, capsys):
    assert sweep.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "--resume: expected a run folder" in _one_error_line(capsys.readouterr().err)


def _epoch_line(err, epoch):
    return next(x for x in err.splitlines() if x.startswith(f"epoch {epoch}/") and ": loss" in x)


def test_progress_line_shows_the_range_of_the_live_members_rates_not_their_mean(tmp_path, tiny_cifar, capsys):
    assert sweep.main(_argv(tiny_cifar, tmp_path, "--lr", "0.05,0.01", "--epochs", "1")) == 0
    line = _epoch_line(capsys.readouterr().err, 1)
    assert "1.00e-02" in line and "5.00e-02" in line and "3.00e-02" not in line, line


def test_progress_line_averages_loss_accuracy_and_rate_over_the_same_live_members(tmp_path, tiny_cifar, capsys):
    run = tmp_path / "runs" / "s"
    assert sweep.main(_argv(tiny_cifar, tmp_path, "--lr", "0.05,1e30", "--epochs", "1")) == 0
    line = _epoch_line(capsys.readouterr().err, 1)
    row = _metrics(run)[-1]
    assert row["diverged"] == [False, True]
    assert f"loss {row['train_loss'][0]:.4f}" in line, line
    assert f"test {100 * row['test_accuracy'][0]:.2f}%" in line, line
    assert "lr 5.00e-02" in line and "e+29" not in line and "e+30" not in line, line


def test_an_interrupted_sweep_names_its_resume_command_and_resumes_bit_for_bit(tmp_path, tiny_cifar,
                                                                               monkeypatch, capsys):
    import experiments.ensembles.sweep as study

    flags = ("--lr", "0.05,0.01", "--momentum", "0.9", "--seeds", "2", "--epochs", "2")
    assert sweep.main(_argv(tiny_cifar, tmp_path, *flags, name="whole")) == 0
    real = study.fit

    def boom(epoch, step):
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt

    monkeypatch.setattr(study, "fit", lambda *a, **k: real(*a, on_step=boom, **k))
    run = tmp_path / "runs" / "part"
    assert sweep.main(_argv(tiny_cifar, tmp_path, *flags, name="part")) == 130
    err = capsys.readouterr().err
    assert f"resume with: python -m experiments.sweep --resume {run}" in err.splitlines()
    monkeypatch.setattr(study, "fit", real)
    assert sweep.main(["--resume", str(run)]) == 0
    keys = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "diverged")
    whole, part = _metrics(tmp_path / "runs" / "whole"), _metrics(run)
    assert [{k: r[k] for k in keys} for r in part] == [{k: r[k] for k in keys} for r in whole]
