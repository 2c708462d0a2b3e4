"""python -m experiments.bench_airbench: the registry's airbench package (0.1.8) trained unmodified
on the CPU (docs/speedrun.md, "The airbench package itself").

The patched lines are found in the installed sources and named; a smoke run of two batches on a
generated CIFAR-10 writes the accuracy at every TTA level and the time of each epoch; the device
plumbing is restored afterwards; the training file airbench reads is in one fixed shuffled
order; a missing data folder is one line."""
import json
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("airbench")

from experiments import bench_airbench  # noqa: E402
from experiments.benchmarks import airbench_package as ap  # noqa: E402
from experiments.data.dataset import Dataset  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def test_every_patched_line_is_found_in_the_installed_package_and_named():
    lines = ap.patched_lines()
    by_code = {}
    for line in lines:
        by_code.setdefault(line.code, []).append(line)
    assert set(by_code) == {code for _, code, _ in ap.PATCHES}
    assert [line.file for line in by_code["net = net.half().cuda()"]] == ["airbench/lib_airbench94.py"]
    assert len(by_code["torch.cuda.synchronize()"]) == 3           # whitening, each epoch, TTA
    for line in lines:
        source = open(sys.modules[f"airbench.{line.file.split('/')[-1][:-3]}"].__file__).read()
        assert source.splitlines()[line.line - 1].strip() == line.code
    assert str(lines[0]).startswith("airbench/lib_airbench94.py:127: net = net.half().cuda()  ->  ")


def test_a_changed_package_version_is_refused(monkeypatch):
    import importlib.metadata
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.2.0")
    with pytest.raises(ImportError, match=r"airbench: expected version 0\.1\.8 .*got 0\.2\.0"):
        ap.patched_lines()


def test_the_cpu_net_keeps_float32_weights_and_returns_float32_logits_from_a_bf16_forward():
    from airbench.lib_airbench94 import make_net94
    seen = []
    net = ap._cpu_net(make_net94, bf16=True)()
    net[7].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert all(p.device.type == "cpu" for p in net.parameters())
    out = net(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last))
    assert out.dtype == torch.float32 and seen == [torch.bfloat16]
    assert nn.Module.half(nn.Linear(1, 1)).weight.dtype == torch.float16   # restored


def test_the_training_file_is_in_one_fixed_shuffled_order(tmp_path):
    labels = torch.arange(10).repeat_interleave(30)                  # ordered by class, as ours
    images = labels.view(-1, 1, 1, 1).expand(-1, 3, 32, 32).to(torch.uint8).contiguous()
    data = Dataset(images, labels, tuple(str(c) for c in range(10)))
    first = torch.load(ap.write_airbench_data(tmp_path, "train", data, shuffle=True))
    again = torch.load(ap.write_airbench_data(tmp_path, "train", data, shuffle=True))
    assert first["images"].shape == (300, 32, 32, 3) and first["images"].dtype == torch.uint8
    assert torch.equal(first["labels"], again["labels"])
    assert torch.equal(first["images"][:, 0, 0, 0].long(), first["labels"])   # pairs kept
    assert len(set(first["labels"][:30].tolist())) > 5                # the first images mix classes
    assert sorted(first["labels"].tolist()) == sorted(labels.tolist())
    test = torch.load(ap.write_airbench_data(tmp_path, "test", data))
    assert torch.equal(test["labels"], labels) and test["classes"] == list(data.classes)


def test_two_batches_on_generated_data_write_every_tta_level_and_each_epochs_time(
        cifar_folder, tmp_path, capsys):
    data = cifar_folder(4, 2)                                         # 40 training images
    out = tmp_path / "package.json"
    event, sync, half = torch.cuda.Event, torch.cuda.synchronize, nn.Module.half
    code = bench_airbench.main(["--data-dir", str(data), "--batch-size", "20", "--epochs", "1",
                                "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "airbench/utils.py:261: test_loader = CifarLoader('cifar10'" in captured.err
    assert "|  run     |  epoch  |" in captured.err                     # airbench's own table
    result = json.loads(out.read_text())
    assert json.loads(captured.out.strip().splitlines()[-1])["accuracy"] == result["accuracy"]
    assert set(result["accuracy"]) == {"test"}
    assert set(result["accuracy"]["test"]) == {"none", "mirror", "mirror_translate"}
    assert all(0 <= a <= 1 for a in result["accuracy"]["test"].values())
    assert len(result["epoch_s"]) == 1 and result["epoch_s"][0] > 0
    assert result["train_s"] == pytest.approx(result["whiten_s"] + result["epoch_s"][0])
    assert result["data"] == {"train": 40, "val": 0, "test": 20}
    assert result["config"]["seed"] == 0 and result["config"]["epochs"] == 1.0
    assert len(result["patched"]) == 7 and len(result["load_average"]["start"]) == 3
    # the device plumbing is airbench's and torch's again
    import airbench.utils
    assert (torch.cuda.Event, torch.cuda.synchronize, nn.Module.half) == (event, sync, half)
    assert airbench.utils.CifarLoader.__module__ == "airbench.utils"


def test_a_validation_split_is_evaluated_beside_the_test_split(cifar_folder, tmp_path, capsys):
    data = cifar_folder(4, 2)
    out = tmp_path / "package.json"
    assert bench_airbench.main(["--data-dir", str(data), "--batch-size", "15", "--epochs", "1",
                                "--val-split", "10", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["accuracy"]) == {"test", "val"}
    assert result["data"] == {"train": 30, "val": 10, "test": 20}


def test_a_missing_data_folder_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    assert bench_airbench.main(["--data-dir", str(tmp_path / "none"),
                                "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "x.json").exists()
