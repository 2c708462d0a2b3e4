"""The command lines refuse bad input with one line and exit status 2, before they touch the disk.

Each case was found by trying the CLIs as a new user would (issue 13). "Before they touch the
disk" is checked by the run folder: a refused command must not create it, so that rerunning with
the value fixed works without --resume or a new --name.
"""
import json
import math

import pytest
import torch

import nets
from experiments import evaluate, visualize
from experiments.cifar import cli
from experiments.data import cifar10
from experiments.train import runs
from random_cifar import write_random_images

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def tiny_cifar(cifar_folder):
    """A 32x32 PNG image-folder CIFAR-10 with 4 train and 2 test images per class."""
    return cifar_folder(4, 2)


def _run(tmp_path, tiny_cifar, *flags, model="cifar_model_a"):
    argv = ["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "runs"), "--name", "r",
            "--no-bf16", *flags]
    return cli.main(model, model[-1].upper(), argv)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


# ----------------------------------------------------------------- hyperparameters before disk


@pytest.mark.parametrize("flags, needle", [
    (["--label-smoothing", "2"], "--label-smoothing"),
    (["--label-smoothing", "-0.1"], "--label-smoothing"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--weight-decay=-1e-4"], "--weight-decay"),
    (["--device", "tpu"], "tpu"),
    (["--device", "cuda:x"], "cuda:x"),
    (["--crop", "-1"], "--crop"),
    (["--limit-per-class", "0"], "--limit-per-class"),
    (["--max-epochs", "0"], "--max-epochs"),
    (["--seed", "-1"], "--seed"),
    (["--val-split", "-5"], "--val-split"),
])
def test_a_bad_hyperparameter_is_one_line_exit_2_and_no_run_folder(flags, needle, tmp_path,
                                                                   tiny_cifar, capsys):
    assert _run(tmp_path, tiny_cifar, *flags) == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_is_refused(tmp_path, tiny_cifar, capsys):
    assert _run(tmp_path, tiny_cifar, "--device", "cuda") == 2
    _one_line_error(capsys, "CUDA is not available")
    assert not (tmp_path / "runs").exists()


def test_after_a_refusal_the_same_name_runs_without_resume(tmp_path, tiny_cifar, capsys):
    assert _run(tmp_path, tiny_cifar, "--label-smoothing", "2", "--epochs", "1",
                "--batch-size", "10") == 2
    assert _run(tmp_path, tiny_cifar, "--label-smoothing", "0.1", "--epochs", "1",
                "--batch-size", "10") == 0
    cfg = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert cfg["label_smoothing"] == 0.1


def test_a_batch_larger_than_the_data_names_batch_size(tmp_path, tiny_cifar, capsys):
    # 40 training images (4 per class) and the fast recipe's batch of 512
    assert _run(tmp_path, tiny_cifar) == 2
    _one_line_error(capsys, "--batch-size 512", "40 training images")
    assert not (tmp_path / "runs").exists()


def test_config_records_the_resolved_data_folder_also_from_the_environment(
        tmp_path, tiny_cifar, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(tiny_cifar))
    argv = ["--out", str(tmp_path / "runs"), "--name", "env", "--epochs", "1", "--batch-size", "10",
            "--no-bf16"]
    assert cli.main("cifar_model_a", "A", argv) == 0
    cfg = json.loads((tmp_path / "runs" / "env" / "config.json").read_text())
    assert cfg["data_dir"] == str(tiny_cifar.resolve())


# ---------------------------------------------------------------------------------- resume


@pytest.fixture
def constant_run(tmp_path, tiny_cifar):
    """A finished 1-epoch report-recipe run (Adam, constant learning rate)."""
    assert _run(tmp_path, tiny_cifar, "--recipe", "report", "--epochs", "1", "--val-split", "0",
                "--batch-size", "10") == 0
    return tmp_path / "runs" / "r"


def test_resume_epochs_extends_a_constant_schedule_run(constant_run, tiny_cifar, capsys):
    assert cli.main("cifar_model_a", "A", ["--resume", str(constant_run), "--epochs", "2"]) == 0
    rows = (constant_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    _, progress, cfg = runs.load_run(constant_run)
    assert progress["epoch"] == 2 and cfg["epochs"] == 2
    assert json.loads((constant_run / "config.json").read_text())["epochs"] == 2


def test_resume_epochs_refuses_to_stretch_a_one_cycle_schedule(tmp_path, tiny_cifar, capsys):
    assert _run(tmp_path, tiny_cifar, "--epochs", "1", "--batch-size", "10") == 0
    run = tmp_path / "runs" / "r"
    before = (run / "checkpoint.safetensors").read_bytes()
    assert cli.main("cifar_model_a", "A", ["--resume", str(run), "--epochs", "3"]) == 2
    _one_line_error(capsys, "--epochs 3", "onecycle")
    assert (run / "checkpoint.safetensors").read_bytes() == before


def test_resume_refuses_flags_it_would_ignore(constant_run, capsys):
    assert cli.main("cifar_model_a", "A", ["--resume", str(constant_run), "--lr", "0.5"]) == 2
    _one_line_error(capsys, "--lr")


@pytest.mark.parametrize("damage", ["bytes", "nan"])
def test_resume_and_evaluate_report_a_damaged_checkpoint_in_one_line(damage, constant_run,
                                                                       tiny_cifar, capsys):
    path = constant_run / "checkpoint.safetensors"
    if damage == "bytes":
        path.write_bytes(path.read_bytes()[:100])                # truncated
    else:
        tree, meta = nets.load(path)
        tree["params"]["features.0.weight"][0, 0, 0, 0] = math.nan
        nets.save(path, tree, meta)
    assert cli.main("cifar_model_a", "A", ["--resume", str(constant_run)]) == 2
    _one_line_error(capsys, str(path))
    assert evaluate.main(["--checkpoint", str(constant_run), "--data-dir", str(tiny_cifar)]) == 2
    line = _one_line_error(capsys, str(path))
    if damage == "nan":
        assert "features.0.weight" in line and "NaN" in line
    image = next((tiny_cifar / "test" / "cat").iterdir())
    assert visualize.main(["--checkpoint", str(path), "--image", str(image),
                           "--out", str(constant_run / "v")]) == 2
    line = _one_line_error(capsys, str(path))
    if damage == "nan":
        assert "features.0.weight" in line and "NaN" in line


def test_four_corrupted_bytes_inside_a_tensor_are_caught(constant_run, tiny_cifar, capsys):
    path = constant_run / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = b"\xff\xff\xff\xff"                           # a float32 NaN in the last tensor
    path.write_bytes(bytes(data))
    assert evaluate.main(["--checkpoint", str(constant_run), "--data-dir", str(tiny_cifar)]) != 0
    _one_line_error(capsys, "NaN")


# ------------------------------------------------------------------------------------ data


def test_a_mistyped_data_dir_is_never_created(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PURENN_CACHE", str(tmp_path / "cache"))
    typo = tmp_path / "cifar10-jepg"
    code = cli.main("cifar_model_b", "B", ["--data-dir", str(typo), "--out", str(tmp_path / "runs")])
    assert code == 2
    _one_line_error(capsys, str(typo), "does not exist")
    assert not typo.exists() and not (tmp_path / "runs").exists()


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path, tiny_cifar, capsys):
    for f in (tiny_cifar / "train" / "cat").iterdir():
        f.unlink()
    assert _run(tmp_path, tiny_cifar, "--epochs", "1", "--batch-size", "10") == 2
    _one_line_error(capsys, str(tiny_cifar / "train" / "cat"))
    with pytest.raises(ValueError, match="cat"):
        cifar10.load_cifar10(tiny_cifar, "train", cache=False, progress=False)


def test_a_class_present_only_in_test_is_an_error_naming_it(tmp_path, tiny_cifar):
    write_random_images(tiny_cifar / "test" / "zebra", 2, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"only in test/: zebra"):
        cifar10.load_cifar10(tiny_cifar, "train", cache=False, progress=False)


# -------------------------------------------------------------------------------- progress


def test_progress_to_a_file_comes_as_whole_lines(tmp_path, tiny_cifar):
    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        from experiments.train import ProgressBar

        bar = ProgressBar(5, "epoch 1/1", stream=stream, line_interval=0.0)
        for i in range(1, 6):
            bar.update(i, 10 * i, loss=1.0)
        bar.close("epoch 1/1: done")
        count = ProgressBar(None, "features", stream=stream, line_interval=0.0)
        count.update(3, 3)
        count.close("features: 3 examples")
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    assert text.count("\n") == 8 and text.endswith("features: 3 examples\n")
