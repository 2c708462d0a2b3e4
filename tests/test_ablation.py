"""python -m experiments.ablation: every variant is a run of the run lifecycle. A rerun trains
what its folders lack (more epochs), refuses other seeds or data in one line with every folder
untouched, and the table and its footer are what the folders hold."""
import json

import pytest

import experiments.ensembles.ablation as study
import experiments.ensembles.sweep as sweep_study
from experiments import ablation
from experiments.ensembles.ablation import variants


@pytest.fixture
def tiny_cifar(cifar_folder):
    """A 32x32 PNG image-folder CIFAR-10 with 13 train and 2 test images per class (130 train
    images: one batch of the ablation's 125)."""
    return cifar_folder(13, 2)


@pytest.fixture
def two_variants(monkeypatch):
    """The full recipe and "batch norm off" only: the lifecycle is the same for six."""
    every = study.variants
    monkeypatch.setattr(study, "variants", lambda model: every(model)[:2])


def _argv(tiny_cifar, tmp_path, *flags, seeds=2, epochs=1, limit=4):
    return ["--model", "a", "--seeds", str(seeds), "--epochs", str(epochs), "--data-dir",
            str(tiny_cifar), "--out", str(tmp_path / "runs"), "--device", "cpu",
            "--limit-per-class", str(limit), *flags]


def _snapshot(folder):
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _epochs(variant):
    return [json.loads(x)["epoch"] for x in (variant / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(err):
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    return lines[-1]


def test_ablation_trains_each_variant_and_tables_the_differences(tmp_path, tiny_cifar, capsys):
    argv = ["--model", "a", "--seeds", "2", "--epochs", "1", "--data-dir", str(tiny_cifar),
            "--out", str(tmp_path / "runs"), "--device", "cpu"]
    assert ablation.main(argv + ["--limit-per-class", "4"]) == 2        # batch 125 > 40 images
    assert "variant 'batch 125'" in capsys.readouterr().err
    assert ablation.main(argv) == 0
    err = capsys.readouterr().err
    out = tmp_path / "runs" / "ablation-a"
    names = [name for name, _ in variants("cifar_model_a")]
    for i, name in enumerate(names, 1):                       # it says which variant it trains
        assert f"variant {i}/6: {name} (2 seeds, 1 epoch)" in err
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == names
    assert all(r["n"] + r["diverged"] == 2 for r in rows)
    table = (out / "ablation.md").read_text()
    assert "| batch norm off |" in table and "| batch 125 |" in table
    # every variant's run folder is reused by a rerun, nothing is trained twice
    stamp = (out / "batch-norm-off" / "checkpoint.safetensors").stat().st_mtime_ns
    assert ablation.main(argv) == 0
    assert (out / "batch-norm-off" / "checkpoint.safetensors").stat().st_mtime_ns == stamp
    assert "training variant" not in capsys.readouterr().err


def test_ablation_refuses_bad_flags_before_training(tmp_path, tiny_cifar, capsys):
    for flags, needle in ((["--seeds", "0"], "--seeds"), (["--epochs", "0"], "--epochs"),
                          (["--limit-per-class", "0"], "--limit-per-class"),
                          (["--max-epochs", "0"], "--max-epochs"), (["--name", "../x"], "--name")):
        assert ablation.main(["--model", "b", "--data-dir", str(tiny_cifar),
                              "--out", str(tmp_path / "runs"), *flags]) == 2
        assert needle in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_a_rerun_with_more_epochs_trains_them_and_the_footer_counts_the_folders(
        tmp_path, tiny_cifar, two_variants, capsys):
    # before: it finished in 3 s and printed the old table under a footer that said 2 epochs
    out = tmp_path / "runs" / "ablation-a"
    assert ablation.main(_argv(tiny_cifar, tmp_path, epochs=1)) == 0
    assert "1 epoch, 2 seeds per variant" in (out / "ablation.md").read_text()
    before = json.loads((out / "ablation.json").read_text())["rows"]
    capsys.readouterr()
    assert ablation.main(_argv(tiny_cifar, tmp_path, epochs=2)) == 0
    printed = capsys.readouterr().out
    for variant in ("full-report-recipe", "batch-norm-off"):
        assert _epochs(out / variant) == [1, 2]
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["epochs"] for r in rows] == [2, 2] and [r["members"] for r in rows] == [2, 2]
    assert "2 epochs, 2 seeds per variant" in printed and "2 epochs," in (out / "ablation.md").read_text()
    last = json.loads((out / "full-report-recipe" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows[0]["mean"] == pytest.approx(sum(last["test_accuracy"]) / 2)   # epoch 2's
    assert [r["epochs"] for r in before] == [1, 1]


@pytest.mark.parametrize("changes, needles", [
    # before: the footer said 3 seeds while the table held 2
    (dict(seeds=3, limit=5), ("--seeds [0, 1, 2] (the run's: [0, 1])", "--limit-per-class 5 (the run's: 4)")),
    (dict(seeds=3), ("--seeds [0, 1, 2] (the run's: [0, 1])",)),
    (dict(seeds=1), ("--seeds [0] (the run's: [0, 1])",)),
    (dict(flags=("--val-split", "0.1")), ("--val-split '0.1' (the run's: '0')",)),
])
def test_a_rerun_with_other_seeds_or_data_is_refused_in_one_line_leaving_every_folder(
        changes, needles, tmp_path, tiny_cifar, two_variants, capsys):
    out = tmp_path / "runs" / "ablation-a"
    assert ablation.main(_argv(tiny_cifar, tmp_path)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    flags = changes.pop("flags", ())
    assert ablation.main(_argv(tiny_cifar, tmp_path, *flags, **changes)) == 2
    err = capsys.readouterr()
    line = _one_error_line(err.err)
    assert "variant 'full report recipe'" in line and all(n in line for n in needles), line
    assert err.out == "" and _snapshot(out) == before


def _interrupt_at(monkeypatch, epoch, step):
    """Ctrl-C before batch ``step`` of epoch ``epoch`` of the first variant fit trains."""
    real = sweep_study.fit

    def boom(e, s):
        if (e, s) == (epoch, step):
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep_study, "fit", lambda *a, **k: real(*a, on_step=boom, **k))
    return real


def test_an_interrupted_variant_names_the_ablation_command_and_refuses_other_data_or_seeds(
        tmp_path, tiny_cifar, two_variants, monkeypatch, capsys):
    out = tmp_path / "runs" / "ablation-a"
    variant = out / "full-report-recipe"
    argv = _argv(tiny_cifar, tmp_path, limit=8)                    # 80 images: 2 batches of 32
    real = _interrupt_at(monkeypatch, 0, 1)
    assert ablation.main(argv + ["--max-epochs", "5"]) == 130
    err = capsys.readouterr().err
    # before: the hint said `--resume <variant>`, which the ablation does not accept
    hint = next(x for x in err.splitlines() if x.startswith("resume with: "))
    assert hint == "resume with: python -m experiments.ablation " + " ".join(argv), hint
    monkeypatch.setattr(sweep_study, "fit", real)
    before = _snapshot(out)
    # before: it resumed the mid-epoch checkpoint on other data and rewrote config.json
    assert ablation.main(_argv(tiny_cifar, tmp_path, epochs=2, limit=30)) == 2
    assert "--limit-per-class 30 (the run's: 8)" in _one_error_line(capsys.readouterr().err)
    # before: a 97-line CheckpointMismatchError traceback
    assert ablation.main(_argv(tiny_cifar, tmp_path, seeds=3, limit=8)) == 2
    assert "--seeds [0, 1, 2] (the run's: [0, 1])" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(out) == before
    # the hint's command continues it
    assert ablation.main(argv) == 0
    assert "resuming" in capsys.readouterr().err and _epochs(variant) == [1]
    assert (out / "ablation.md").is_file()


def test_a_damaged_metrics_file_of_a_finished_variant_is_one_line(tmp_path, tiny_cifar, two_variants, capsys):
    argv = _argv(tiny_cifar, tmp_path)
    assert ablation.main(argv) == 0
    metrics = tmp_path / "runs" / "ablation-a" / "batch-norm-off" / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:20])
    capsys.readouterr()
    assert ablation.main(argv) == 2
    assert "metrics.jsonl: expected one JSON object per line" in _one_error_line(capsys.readouterr().err)
