"""The run lifecycle (experiments.train.lifecycle) and the typed settings under it: a rerun or a
resume with changed settings continues soundly or refuses in one line naming each differing
setting, and a refused command leaves the run folder as it was, byte for byte."""
import dataclasses
import hashlib
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.cifar import cli
from experiments.cifar.config import RECIPES, CifarConfig
from experiments.common.files import DamagedFileError, read_jsonl, write_jsonl
from experiments.common.settings import SettingsError
from experiments.train.lifecycle import RunRefused, open_run, run_folder
from experiments.train.settings import OptimizerSettings, TrainSettings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def tiny_cifar(cifar_folder):
    return cifar_folder(4, 2)


def _snapshot(folder):
    """Every file of a folder and the hash of its bytes: what "left as it was" compares."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def _new_run(tmp_path, tiny_cifar, *flags):
    argv = ["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "runs"), "--name", "r",
            "--no-bf16", "--batch-size", "10", "--val-split", "0", *flags]
    assert cli.main("cifar_model_a", "A", argv) == 0
    return tmp_path / "runs" / "r"


# ------------------------------------------------------------------------------ typed settings


def test_every_recipe_round_trips_through_config_json():
    for recipes in RECIPES.values():
        for cfg in recipes.values():
            assert CifarConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["lr", "weight_decay", "label_smoothing", "bn_eps", "pct_start"]),
       st.sampled_from([math.inf, -math.inf, math.nan]))
def test_non_finite_numbers_are_refused_with_a_range_that_excludes_them(name, value):
    with pytest.raises(SettingsError) as err:
        CifarConfig(**{name: value})
    message = str(err.value)
    assert message.startswith(f"--{name.replace('_', '-')}: expected a finite number in ")
    assert "inf]" not in message and "[-inf" not in message   # the printed range excludes inf


def test_unknown_settings_in_a_stored_config_are_refused_in_one_line():
    with pytest.raises(SettingsError, match="unknown frobnicate"):
        CifarConfig.from_json({**CifarConfig().to_json(), "frobnicate": 1}, where="x/config.json")


def test_a_config_saved_before_a_setting_existed_takes_its_default():
    old = CifarConfig().to_json()
    del old["tta_shift_weight"], old["whiten_init"]
    assert CifarConfig.from_json(old) == CifarConfig()


def test_cross_setting_checks_refuse_nesterov_without_momentum():
    with pytest.raises(SettingsError, match="--nesterov"):
        OptimizerSettings(optimizer="sgd", nesterov=True, momentum=0.0)


# ------------------------------------------------------------------------------ open_run


@dataclasses.dataclass(frozen=True)
class _Constant(OptimizerSettings, TrainSettings):
    pass


def _stored(tmp_path, cfg, epochs_done=1):
    """A run folder as fit leaves it after ``epochs_done`` epochs (config and checkpoint)."""
    import torch

    run = open_run(tmp_path / "run", cfg, command="cmd")
    run.begin({"w": torch.zeros(1)}, {}, {}, torch.zeros(2, dtype=torch.int64))
    run.save({"w": torch.zeros(1)}, {}, {}, torch.zeros(2, dtype=torch.int64),
             {"epoch": epochs_done, "step": 0})
    return tmp_path / "run"


def test_a_rerun_of_an_existing_run_is_refused_unless_it_resumes(tmp_path):
    folder = _stored(tmp_path, _Constant(epochs=2))
    with pytest.raises(RunRefused, match="already holds a run; continue it with `cmd --resume"):
        open_run(folder, _Constant(epochs=2), command="cmd")
    assert open_run(folder, _Constant(epochs=2), command="cmd", resume=True).resumed


def test_more_epochs_of_a_constant_schedule_continue_and_a_spanning_schedule_refuses(tmp_path):
    folder = _stored(tmp_path, _Constant(epochs=2))
    run = open_run(folder, _Constant(epochs=5), command="cmd", resume=True)
    assert run.config.epochs == 5
    onecycle = _stored(tmp_path / "b", _Constant(epochs=2, schedule="onecycle"))
    with pytest.raises(RunRefused, match="onecycle schedule spans them"):
        open_run(onecycle, _Constant(epochs=3, schedule="onecycle"), command="cmd", resume=True)


def test_fewer_epochs_than_completed_are_refused(tmp_path):
    folder = _stored(tmp_path, _Constant(epochs=4), epochs_done=3)
    with pytest.raises(RunRefused, match="has already completed 3"):
        open_run(folder, _Constant(epochs=2), command="cmd", resume=True)


def test_the_refusal_names_every_differing_setting_and_where_settings_may_move(tmp_path):
    folder = _stored(tmp_path, _Constant(epochs=2, lr=0.1))
    before = _snapshot(folder)
    with pytest.raises(RunRefused) as err:
        open_run(folder, _Constant(epochs=2, lr=0.5, batch_size=7), command="cmd", resume=True)
    assert "--lr 0.5 (the run's: 0.1)" in str(err.value) and "--batch-size 7" in str(err.value)
    assert "\n" not in str(err.value)
    assert _snapshot(folder) == before
    assert open_run(folder, _Constant(epochs=2, lr=0.1, device="cpu"), command="cmd",
                    resume=True).config.device == "cpu"


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", ""])
def test_a_run_name_cannot_leave_the_out_folder(name, tmp_path):
    with pytest.raises(RunRefused, match="--name: expected a folder name inside --out"):
        run_folder(tmp_path, name)


def test_strict_json_writes_null_for_a_diverged_value_and_a_damaged_line_is_one_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, [{"epoch": 1, "train_loss": [0.5, math.nan, math.inf]}])
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert read_jsonl(path) == [{"epoch": 1, "train_loss": [0.5, None, None]}]
    path.write_text(path.read_text() + '{"epoch": 2, "train_lo\n')
    with pytest.raises(DamagedFileError, match="damaged line 2"):
        read_jsonl(path)


# ------------------------------------------------------------------------------ the CIFAR command


def test_resume_with_more_epochs_of_a_constant_run_trains_them(tmp_path, tiny_cifar):
    run = _new_run(tmp_path, tiny_cifar, "--recipe", "report", "--epochs", "1")
    assert cli.main("cifar_model_a", "A", ["--resume", str(run), "--epochs", "2"]) == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def test_resume_with_changed_settings_refuses_naming_each_and_leaves_the_folder(tmp_path, tiny_cifar,
                                                                               capsys):
    run = _new_run(tmp_path, tiny_cifar, "--recipe", "report", "--epochs", "1")
    before = _snapshot(run)
    capsys.readouterr()
    assert cli.main("cifar_model_a", "A", ["--resume", str(run), "--lr", "0.5",
                                           "--limit-per-class", "3"]) == 2
    _one_line_error(capsys, "--lr 0.5 (the run's: 0.001)", "--limit-per-class 3 (the run's: None)")
    assert _snapshot(run) == before


def test_a_flag_that_changes_nothing_is_accepted_on_resume(tmp_path, tiny_cifar):
    run = _new_run(tmp_path, tiny_cifar, "--recipe", "report", "--epochs", "2", "--max-epochs", "1")
    assert cli.main("cifar_model_a", "A", ["--resume", str(run), "--batch-size", "10"]) == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("damaged", ["metrics.jsonl", "config.json"])
def test_a_damaged_run_file_is_one_line_not_a_traceback(damaged, tmp_path, tiny_cifar, capsys):
    run = _new_run(tmp_path, tiny_cifar, "--recipe", "report", "--epochs", "2", "--max-epochs", "1")
    (run / damaged).write_text('{"epoch": 1, "train_lo')
    if damaged == "config.json":   # the checkpoint carries the config; config.json is for people
        assert cli.main("cifar_model_a", "A", ["--resume", str(run)]) == 0
        assert json.loads((run / "config.json").read_text())["epochs"] == 2
        return
    capsys.readouterr()
    assert cli.main("cifar_model_a", "A", ["--resume", str(run)]) == 2
    _one_line_error(capsys, "metrics.jsonl", "damaged line 1")


def test_name_outside_out_is_refused_before_any_folder(tmp_path, tiny_cifar, capsys):
    argv = ["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "runs"), "--name", "../x"]
    assert cli.main("cifar_model_a", "A", argv) == 2
    _one_line_error(capsys, "--name: expected a folder name inside --out")
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()


def test_limit_per_class_zero_is_refused_as_a_flag(tmp_path, tiny_cifar, capsys):
    argv = ["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "runs"), "--limit-per-class", "0"]
    assert cli.main("cifar_model_a", "A", argv) == 2
    _one_line_error(capsys, "--limit-per-class: expected a whole number >= 1, got 0")


def test_the_interrupt_hint_names_the_real_command(tmp_path, tiny_cifar, capsys, monkeypatch):
    from experiments.train import loop

    real = loop._Loop.epoch

    def interrupted(self, trees, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop._Loop, "epoch", interrupted)
    argv = ["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "runs"), "--name", "r",
            "--no-bf16", "--batch-size", "10"]
    assert cli.main("cifar_model_a", "A", argv) == 130
    assert (f"resume with: python -m experiments.cifar_model_a --resume {tmp_path / 'runs' / 'r'}"
            in capsys.readouterr().err)
    monkeypatch.setattr(loop._Loop, "epoch", real)
