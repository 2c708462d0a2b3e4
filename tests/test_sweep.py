"""python -m experiments.sweep: grids refused before anything runs, a sweep of a tiny grid on a
generated CIFAR folder (table, figures, per-member metrics, evaluate per member), and resume."""
import json

import pytest

from experiments import evaluate, sweep
from experiments.ensembles.grid import check_grid, members, parse_values


@pytest.fixture
def tiny_cifar(cifar_folder):
    """A 32x32 PNG image-folder CIFAR-10 with 13 train and 2 test images per class (130 train
    images: one batch of the ablation's 125)."""
    return cifar_folder(13, 2)


@pytest.mark.parametrize("flags, needle", [
    (["--lr", ""], "--lr"),
    (["--lr", "0.1,,0.2"], "--lr"),
    (["--lr", "fast"], "--lr: expected numbers, got 'fast'"),
    (["--lr", "-0.1"], "--lr: expected values > 0"),
    (["--momentum", "0.9,-1"], "--momentum"),
    (["--lr", "1,2,3,4,5", "--momentum", "0.1,0.2,0.3", "--seeds", "5"], "--max-members"),
    (["--seeds", "0"], "--seeds"),
    (["--epochs", "0"], "--epochs"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum"),
])
def test_a_bad_grid_is_one_line_exit_2_and_no_run_folder(flags, needle, tmp_path, tiny_cifar, capsys):
    code = sweep.main(["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and needle in err[-1], err
    assert not (tmp_path / "runs").exists()


def test_a_grid_is_the_product_of_its_lists_once_per_seed():
    ms = members({"lr": [0.1, 0.01], "momentum": [0.9, 0.5]}, seeds=3, first_seed=10)
    assert len(ms) == 12 and ms[0].point == {"lr": 0.1, "momentum": 0.9} and ms[0].seed == 10
    assert [m.seed for m in ms[:3]] == [10, 11, 12] and ms[3].point == {"lr": 0.1, "momentum": 0.5}
    assert parse_values("lr", " 1e-3, 0.5 ") == [1e-3, 0.5]
    check_grid({"lr": [0.1]}, 64, 64)
    with pytest.raises(ValueError, match="--max-members: expected at most 64 members, got 65"):
        check_grid({"lr": [0.1]}, 65, 64)


def test_sweep_trains_every_member_writes_its_table_and_figures_and_resumes(tmp_path, tiny_cifar, capsys):
    argv = ["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "runs"), "--name", "s",
            "--lr", "0.05,1e30", "--momentum", "0.5,0.9", "--seeds", "2", "--epochs", "2",
            "--batch-size", "10", "--device", "cpu", "--limit-per-class", "4"]
    assert sweep.main(argv + ["--max-epochs", "1"]) == 0
    run = tmp_path / "runs" / "s"
    assert not (run / "table.md").exists()                      # not finished yet
    assert sweep.main(["--resume", str(run)]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and len(rows[-1]["test_accuracy"]) == 8
    assert rows[-1]["diverged"] == [False] * 4 + [True] * 4     # lr 1e30 diverges, alone
    table = (run / "table.md").read_text()
    assert "| 0.05 | 0.9 | 0 |" in table and table.count("| 2 | 0 |") == 2
    assert {"sweep_lr.png", "sweep_momentum.png", "results.json"} <= {p.name for p in run.iterdir()}
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


def test_ablation_trains_each_variant_and_tables_the_differences(tmp_path, tiny_cifar, capsys):
    from experiments import ablation
    from experiments.ensembles.ablation import variants

    argv = ["--model", "a", "--seeds", "2", "--epochs", "1", "--data-dir", str(tiny_cifar),
            "--out", str(tmp_path / "runs"), "--device", "cpu"]
    assert ablation.main(argv + ["--limit-per-class", "4"]) == 2        # batch 125 > 40 images
    assert "variant 'batch 125'" in capsys.readouterr().err
    assert ablation.main(argv) == 0
    out = tmp_path / "runs" / "ablation-a"
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [name for name, _ in variants("cifar_model_a")]
    assert all(r["n"] + r["diverged"] == 2 for r in rows)
    table = (out / "ablation.md").read_text()
    assert "| batch norm off |" in table and "| batch 125 |" in table
    # every variant's run folder is reused by a rerun, nothing is trained twice
    stamp = (out / "batch-norm-off" / "checkpoint.safetensors").stat().st_mtime_ns
    assert ablation.main(argv) == 0
    assert (out / "batch-norm-off" / "checkpoint.safetensors").stat().st_mtime_ns == stamp


def test_ablation_refuses_bad_flags_before_training(tmp_path, tiny_cifar, capsys):
    from experiments import ablation

    assert ablation.main(["--model", "b", "--seeds", "0", "--data-dir", str(tiny_cifar),
                          "--out", str(tmp_path / "runs")]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
