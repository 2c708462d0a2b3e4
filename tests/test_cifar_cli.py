"""The command lines: --help of every entry point, a run / resume / evaluate cycle on a generated
data set, the missing-data message, and a smoke run on real CIFAR-10 when CIFAR10_DIR is set."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import evaluate
from experiments.cifar import cli as cli
from experiments.cifar import recipes
from experiments.cifar.speed import benchmark
from experiments.data.cifar10 import CIFAR10_CLASSES

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["experiments.cifar_model_a", "experiments.cifar_model_b",
                "experiments.cifar_model_c", "experiments.evaluate"]
OUTPUTS = {"config.json", "metrics.jsonl", "accuracy.png", "loss.png", "confusion.png",
           "checkpoint.safetensors"}


def test_help_works_for_every_entry_point():
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for m in ENTRY_POINTS}
    for m, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (m, err)
        assert f"usage: python -m {m}" in out
        flags = ["--checkpoint", "--data-dir", "--split"] if m.endswith("evaluate") else [
            "--epochs", "--batch-size", "--lr", "--seed", "--device", "--out", "--data-dir",
            "--val-split", "--resume", "--recipe", "--limit-per-class", "--name"]
        for flag in flags:
            assert flag in out, (m, flag)


def test_run_stop_resume_and_evaluate_through_the_command_line(tiny_cifar, tmp_path, capsys):
    argv = ["--data-dir", str(tiny_cifar), "--epochs", "2", "--batch-size", "20", "--val-split", "10",
            "--out", str(tmp_path / "runs"), "--name", "cli", "--no-bf16", "--seed", "1"]
    assert cli.main("cifar_model_a", "A", argv + ["--max-epochs", "1"]) == 0
    run = tmp_path / "runs" / "cli"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    # a second fresh start would clobber the run: refused
    assert cli.main("cifar_model_a", "A", argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main("cifar_model_a", "A", ["--resume", str(run)]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["val_accuracy"] is not None and rows[0]["test_accuracy"] is not None
    assert OUTPUTS <= {p.name for p in run.iterdir()}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["batch_size"] == 20 and cfg["bf16"] is False and cfg["val_split"] == "10"
    # a run of Model A is not resumed by Model B's entry point
    assert cli.main("cifar_model_b", "B", ["--resume", str(run)]) == 2
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(run), "--data-dir", str(tiny_cifar), "--json"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and all(c in out for c in CIFAR10_CLASSES)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["accuracy"] == pytest.approx(rows[-1]["test_accuracy"])


def test_evaluate_rebuilds_the_runs_validation_split_and_takes_tta_options(tiny_cifar, tmp_path, capsys):
    argv = ["--data-dir", str(tiny_cifar), "--epochs", "1", "--batch-size", "20",
            "--out", str(tmp_path / "runs"), "--no-bf16", "--seed", "3"]
    assert cli.main("cifar_model_a", "A", argv + ["--val-split", "20", "--name", "val",
                                                           "--cutout", "8"]) == 0
    row = json.loads((tmp_path / "runs" / "val" / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads((tmp_path / "runs" / "val" / "config.json").read_text())["cutout"] == 8
    capsys.readouterr()
    base = ["--checkpoint", str(tmp_path / "runs" / "val"), "--data-dir", str(tiny_cifar), "--json"]
    assert evaluate.main(base + ["--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "on val of 20 images" in out
    assert json.loads(out.strip().splitlines()[-1])["loss"] == pytest.approx(row["val_loss"])
    assert evaluate.main(base + ["--split", "val", "--tta-shift", "1"]) == 0
    assert "tta_shift=1" in capsys.readouterr().out
    assert evaluate.main(base + ["--split", "val", "--tta-shift", "1", "--tta-shift-weight", "0.5"]) == 0
    assert "tta_shift=1, tta_shift_weight=0.5" in capsys.readouterr().out
    assert evaluate.main(base + ["--tta-shift", "1", "--tta-shift-weight", "2"]) == 2
    assert "expected tta_shift_weight to be a number in [0, 1]" in capsys.readouterr().err
    assert evaluate.main(base + ["--tta-shift", "-1"]) == 2
    assert "expected tta_shift to be a whole number of pixels >= 0, got -1" in capsys.readouterr().err
    # a run without a validation split has none to rebuild
    assert cli.main("cifar_model_a", "A", argv + ["--val-split", "0", "--name", "noval"]) == 0
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(tmp_path / "runs" / "noval"), "--data-dir",
                          str(tiny_cifar), "--split", "val"]) == 2
    assert "--split val: expected a run trained with a validation split, got val_split='0'" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--crop", "--cutout", "--tta-shift"])
def test_negative_pixel_counts_are_refused_before_anything_runs(flag, tmp_path, capsys):
    assert cli.main("cifar_model_b", "B", [flag, "-2", "--out", str(tmp_path / "runs")]) == 2
    assert f"{flag}: expected a whole number of pixels >= 0, got -2" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_augmentation_flags_override_the_recipe():
    parser = cli.build_parser("cifar_model_c", "C")
    def config(argv):
        return cli.requested_config("cifar_model_c", parser.parse_args(argv))[0]

    report = config(["--recipe", "report"])
    # the report names random flipping (and normalisation) as its only transforms
    assert (report.flip, report.crop, report.tta_flip) == (True, 0, False)
    plain = config(["--recipe", "report", "--no-flip"])
    assert (plain.flip, plain.crop) == (False, 0)
    fast = config(["--crop", "2", "--no-flip"])
    assert (fast.flip, fast.crop) == (False, 2)
    assert config([]).crop == 4


def test_missing_data_stops_with_one_message_naming_the_place(tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    (tmp_path / "nothing").mkdir()   # an existing empty folder: the download is tried there
    code = cli.main("cifar_model_b", "B", ["--data-dir", str(tmp_path / "nothing"),
                                                     "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "nothing") in err and "no network" in err


def test_val_split_parsing():
    assert recipes.parse_val_split("0.1") == 0.1
    assert recipes.parse_val_split("5000") == 5000
    assert recipes.parse_val_split("0") == 0
    with pytest.raises(ValueError, match="--val-split: expected a fraction.*got '2.5'"):
        recipes.parse_val_split("2.5")
    with pytest.raises(ValueError, match="got 'x'"):
        recipes.parse_val_split("x")


@pytest.mark.skipif(not os.environ.get("CIFAR10_DIR"), reason="CIFAR10_DIR is not set")
def test_smoke_run_on_a_real_cifar_subset_loss_falls_and_every_output_appears(tmp_path, monkeypatch):
    monkeypatch.setenv("PURENN_CACHE", str(tmp_path / "cache"))
    argv = ["--limit-per-class", "20", "--epochs", "2", "--batch-size", "50", "--lr", "0.05",
            "--val-split", "0", "--out", str(tmp_path / "runs"), "--name", "smoke"]
    assert cli.main("cifar_model_a", "A", argv) == 0
    run = tmp_path / "runs" / "smoke"
    assert OUTPUTS <= {p.name for p in run.iterdir()}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["train_loss"] < rows[0]["train_loss"]
    assert 0.0 <= rows[1]["test_accuracy"] <= 1.0


def test_benchmark_reports_images_per_second_for_every_speed_option():
    args = cli.build_parser("cifar_model_a", "A").parse_args(
        ["--benchmark", "1", "--batch-size", "8", "--device", "cpu"])
    err = io.StringIO()
    rates = benchmark(cli.requested_config("cifar_model_a", args)[0], args.benchmark,
                      rounds=1, stream=err)
    assert set(rates) == {"fp32", "channels_last", "bf16", "bf16+channels_last"}
    assert all(r > 0 for r in rates.values())
    assert "median img/s over 1 rounds of 1 steps, batch 8" in err.getvalue()


def test_evaluate_against_a_second_run_compares_them_image_by_image(tiny_cifar, tmp_path, capsys):
    argv = ["--data-dir", str(tiny_cifar), "--epochs", "1", "--batch-size", "20", "--val-split", "20",
            "--out", str(tmp_path / "runs"), "--no-bf16"]
    for name, extra in (("a", ["--seed", "3"]), ("b", ["--seed", "3", "--lr", "0.05"]),
                        ("other-seed", ["--seed", "4"])):
        assert cli.main("cifar_model_a", "A", argv + ["--name", name] + extra) == 0
    runs = tmp_path / "runs"
    capsys.readouterr()
    base = ["--checkpoint", str(runs / "a"), "--data-dir", str(tiny_cifar), "--split", "val"]
    assert evaluate.main(base + ["--against", str(runs / "b"), "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    alone = [evaluate.main(["--checkpoint", str(runs / r), "--data-dir", str(tiny_cifar),
                            "--split", "val", "--json"]) for r in ("a", "b")]
    singles = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines() if x.startswith("{")]
    assert alone == [0, 0]
    assert res["accuracy"] == singles[0]["accuracy"] and res["against"]["accuracy"] == singles[1]["accuracy"]
    paired = res["against"]
    assert paired["n"] == 20 and paired["difference"] == pytest.approx(
        singles[0]["accuracy"] - singles[1]["accuracy"])
    assert "a - b:" in out and "McNemar exact p" in out
    # another seed carves other validation images: refused in one line
    assert evaluate.main(base + ["--against", str(runs / "other-seed")]) == 2
    err = capsys.readouterr().err
    assert "--against: expected both runs evaluated on the same val images" in err and "3/20 against 4/20" in err
    # the test split is the same for every run
    assert evaluate.main(["--checkpoint", str(runs / "a"), "--data-dir", str(tiny_cifar),
                          "--against", str(runs / "other-seed")]) == 0
