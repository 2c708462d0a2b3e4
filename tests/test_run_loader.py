"""experiments.catalog: one loader rebuilds the net, its arrays and its evaluation views from any
run folder (a CIFAR run, a sweep's ensemble, a speedrun, a bare checkpoint), including folders
written before the typed configs; and the commands that read run folders (evaluate, inspect,
visualize) say in one line what a run is when they cannot read it the way they were asked.

The run folders here are generated: each net's init saved as a run's checkpoint with the
config.json an older purenn wrote for that command (copied from such runs, trimmed of nothing)."""
import json

import pytest
import torch

import nets
from experiments import evaluate, inspect, visualize
from experiments.catalog import BARE, KINDS, WrongRunError, kind_of, load_trained
from experiments.train.runs import save_checkpoint
from layers import random as jr

pytestmark = pytest.mark.usefixtures("one_thread")

# config.json of `python -m experiments.cifar_model_a --epochs 1 --batch-size 20 --limit-per-class 4`
OLD_CIFAR = {
    "seed": 0, "device": "cpu", "val_split": "0", "limit_per_class": 4, "eval_batch_size": 1000,
    "bf16": False, "channels_last": True, "compile": False, "crop": 4, "flip": True,
    "retain_freed_memory": True, "tta_shift": 0, "cutout": 0, "telemetry": 0, "bn_momentum": 0.1,
    "bn_eps": 1e-05, "lookahead": False, "lookahead_every": 5, "lookahead_decay": 0.7737809374999998,
    "whiten_init": False, "whiten_images": 5000, "whiten_eps": 0.0005, "optimizer": "sgd",
    "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005, "decay_mask": True,
    "schedule": "onecycle", "pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0,
    "label_smoothing": 0.1, "tta_flip": True, "batch_size": 20, "lr": 0.0078125, "epochs": 1,
    "model": "cifar_model_a", "recipe": "fast", "data_dir": "c10", "test": True, "name": "a1"}

# config.json of `python -m experiments.sweep --lr 0.05,0.1 --seeds 2 --epochs 1 --batch-size 10`
OLD_SWEEP = {
    "optimizer": "sgd", "nesterov": False, "weight_decay": 0.0, "decay_mask": False,
    "schedule": "constant", "label_smoothing": 0.0, "crop": 0, "flip": False, "cutout": 0,
    "tta_flip": False, "tta_shift": 0, "bf16": False, "channels_last": False, "compile": False,
    "eval_batch_size": 1000, "device": "cpu", "val_split": "0", "retain_freed_memory": True,
    "momentum": 0.0, "lr": 0.05, "model": "tutorial", "epochs": 1, "batch_size": 10,
    "limit_per_class": 4, "data_dir": "c10", "test": True, "seed": 0,
    "grid": {"lr": [0.05, 0.1], "momentum": [0.0], "weight_decay": [0.0]},
    "points": [{"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0}] * 2
              + [{"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}] * 2,
    "seeds": [0, 1, 0, 1], "member_data_order": False, "recipe": "sweep", "name": "sw"}

# config.json of `python -m experiments.speedrun --epochs 1 --batch-size 20 --widths 8,16,16`
OLD_SPEEDRUN = {
    "model": "airbench94", "seed": 0, "device": "cpu", "val_split": "0", "limit_per_class": 4,
    "eval_batch_size": 1000, "bf16": False, "channels_last": True, "compile": False,
    "retain_freed_memory": True, "epochs": 1, "batch_size": 20, "lr": 11.5, "momentum": 0.85,
    "nesterov": True, "weight_decay": 0.0153, "bias_scaler": 64.0, "label_smoothing": 0.2,
    "schedule": "triangular", "peak_fraction": 0.23, "start_factor": 0.2, "end_factor": 0.07,
    "widths": [8, 16, 16], "activation": "gelu", "bn_momentum": 0.4, "bn_eps": 1e-12,
    "bn_scale": False, "scale": 0.1111111111111111, "whiten": True, "whiten_eps": 0.0005,
    "whiten_images": 5000, "whiten_bias_epochs": 3, "flip": True, "alt_flip": True, "translate": 2,
    "lookahead": True, "lookahead_every": 5, "lookahead_decay": 0.7737809374999998, "tta": True,
    "tta_shift_weight": 0.5, "data_dir": "c10", "test": True, "name": "sp", "tta_flip": True,
    "tta_shift": 1}

# config.json of the transfer study's pretraining run (experiments.cifar_transfer)
OLD_TRANSFER = {
    "seed": 0, "epochs": 8, "batch_size": 256, "optimizer": "sgd", "lr": 0.2, "momentum": 0.9,
    "nesterov": True, "weight_decay": 5e-4, "decay_mask": True, "schedule": "onecycle",
    "pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0, "label_smoothing": 0.1,
    "crop": 4, "flip": True, "tta_flip": False, "bf16": False, "channels_last": True,
    "device": "cpu", "eval_batch_size": 500, "model": "cifar_transfer", "name": "pretrain-A"}


def _write_run(run_dir, net, config, members=None):
    """A run folder holding ``net``'s init (``members`` of them stacked) under ``config``."""
    if members is None:
        params, state = net.init(jr.key(0))
        opt_state = {}
    else:
        trees = [net.init(jr.key(k)) for k in range(members)]
        params, state = nets.stack([p for p, _ in trees]), nets.stack([s for _, s in trees])
        opt_state = {"diverged": torch.zeros(members, dtype=torch.bool)}
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_checkpoint(run_dir / "checkpoint.safetensors", params, state, opt_state, jr.key(0),
                    {"epoch": 1, "step": 0}, config)
    return run_dir


@pytest.fixture
def old_runs(tmp_path):
    runs = tmp_path / "runs"
    return {"cifar": _write_run(runs / "a1", nets.model_a(10), OLD_CIFAR),
            "sweep": _write_run(runs / "sw", nets.tutorial_net(10), OLD_SWEEP, members=4),
            "speedrun": _write_run(runs / "sp", nets.airbench(10, widths=(8, 16, 16)), OLD_SPEEDRUN),
            "transfer": _write_run(runs / "pretrain-A", nets.small_vgg16(5), OLD_TRANSFER)}


# --------------------------------------------------------------------------------------------
# The kinds


def test_the_kind_of_a_run_is_told_from_its_stored_keys():
    assert kind_of(OLD_CIFAR) is KINDS["cifar"]
    assert kind_of(OLD_SWEEP) is KINDS["sweep"]
    assert kind_of({**OLD_SWEEP, "model": "cifar_model_a"}) is KINDS["sweep"]   # an ablation variant
    assert kind_of(OLD_SPEEDRUN) is KINDS["speedrun"]
    assert kind_of({"model": "cifar_transfer", "epochs": 8}) is KINDS["transfer"]
    assert kind_of({}) is BARE and kind_of({"model": "vgg16"}) is BARE


# --------------------------------------------------------------------------------------------
# The loader


def test_old_run_folders_of_every_kind_load_with_their_net_views_and_members(old_runs):
    cifar, sweep, speedrun = (load_trained(old_runs[k]) for k in ("cifar", "sweep", "speedrun"))
    assert cifar.what == "a CIFAR run of cifar_model_a" and cifar.members is None
    assert type(cifar.config).__name__ == "CifarConfig" and cifar.epochs_done == 1
    assert cifar.views() == (True, 0, None, False, True)      # flip TTA, channels-last
    assert cifar.views(tta_shift=1, tta_flip=False) == (False, 1, None, False, True)
    assert sweep.what == "an ensemble of 4 members (a sweep)" and sweep.members == 4
    assert sweep.params["conv1.weight"].shape == (4, 6, 3, 5, 5)
    assert [(m.point["lr"], m.seed) for m in sweep.member_list()] == [(0.05, 0), (0.05, 1), (0.1, 0), (0.1, 1)]
    assert speedrun.what == "a speedrun of airbench94" and speedrun.num_classes == 10
    assert speedrun.views() == (True, 1, 0.5, False, True)
    assert speedrun.views().describe() == "tta_flip=True, tta_shift=1, tta_shift_weight=0.5"
    transfer = load_trained(old_runs["transfer"])
    assert transfer.what == "the transfer study's pretraining run of cifar_transfer"
    assert type(transfer.config).__name__ == "TransferConfig" and transfer.num_classes == 5


def test_the_predictor_is_make_eval_of_the_rebuilt_net_on_the_stored_arrays(old_runs):
    from experiments.train import make_eval, to_channels_last

    run = load_trained(old_runs["speedrun"])
    predict, params, state = run.predictor(run.views(), "cpu")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    net = nets.airbench(10, widths=(8, 16, 16))
    stored, _ = nets.load(old_runs["speedrun"] / "checkpoint.safetensors")
    want = make_eval(net, tta_flip=True, tta_shift=1, shift_weight=0.5, channels_last=True)(
        to_channels_last(stored["params"]), stored["state"], x)
    assert torch.equal(predict(params, state, x), want)
    ensemble = load_trained(old_runs["sweep"])
    predict, params, state = ensemble.predictor(ensemble.views(), "cpu")
    assert predict(params, state, x).shape == (4, 3, 10)


def test_a_config_that_does_not_read_is_refused_in_one_line_naming_the_file(tmp_path):
    run = _write_run(tmp_path / "odd", nets.model_a(10), {**OLD_CIFAR, "colour": "blue"})
    with pytest.raises(ValueError, match=r"config\): expected settings of CifarConfig, got unknown colour") as err:
        load_trained(run)
    assert "\n" not in str(err.value)


def test_a_bare_checkpoint_needs_a_model_and_must_hold_its_parameters(tmp_path):
    params, state = nets.model_b(10).init(jr.key(0))
    nets.save(tmp_path / "bare.safetensors", {"params": params, "state": state})
    with pytest.raises(ValueError, match="expected --model among"):
        load_trained(tmp_path / "bare.safetensors")
    run = load_trained(tmp_path / "bare.safetensors", model="cifar_model_b")
    assert run.kind is BARE and run.config is None and run.views() == (False, 0, None, False, False)
    with pytest.raises(ValueError, match="expected the parameters of model_a"):
        load_trained(tmp_path / "bare.safetensors", model="cifar_model_a")


def test_single_refuses_an_ensemble_naming_what_it_is(old_runs):
    with pytest.raises(WrongRunError, match=r"^visualize: .*sw holds an ensemble of 4 members \(a sweep\): "
                                            r"visualize reads one net$"):
        load_trained(old_runs["sweep"]).single("visualize")
    assert load_trained(old_runs["cifar"]).single("visualize").members is None


# --------------------------------------------------------------------------------------------
# The commands on the wrong kind of run: one line saying what the run is (these printed
# "conv2d: expected 4-D weight ... got (4, 6, 3, 5, 5)" and "tuple index out of range")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_visualize_and_inspect_refuse_an_ensemble_in_one_line_naming_it(old_runs, tmp_path, capsys):
    assert visualize.main(["--checkpoint", str(old_runs["sweep"]), "--out", str(tmp_path / "v")]) == 2
    err = _one_line_error(capsys)
    assert "an ensemble of 4 members (a sweep)" in err and "evaluate reports each member" in err
    assert "conv2d" not in err
    assert inspect.main([str(old_runs["sweep"]), "--out", str(tmp_path / "i")]) == 2
    assert "inspect reads one net" in _one_line_error(capsys)
    assert not (tmp_path / "v").exists() and not (tmp_path / "i").exists()


def test_visualize_and_inspect_ask_for_a_layer_of_the_airbench_net(old_runs, tmp_path, capsys, cifar_folder):
    data = cifar_folder(1, 1)
    assert visualize.main(["--checkpoint", str(old_runs["speedrun"]), "--data-dir", str(data),
                           "--out", str(tmp_path / "v")]) == 2
    assert "the airbench94 net has no ReLU: pass --layers" in _one_line_error(capsys)
    assert inspect.main([str(old_runs["speedrun"]), "--data-dir", str(data), "--images", "10",
                         "--out", str(tmp_path / "i")]) == 2
    err = _one_line_error(capsys)
    assert "the airbench94 net has no ReLU: pass --layer " in err and "2.activ1" in err
    assert "index out of range" not in err
    # with the layer named, both draw the airbench net
    assert visualize.main(["--checkpoint", str(old_runs["speedrun"]), "--data-dir", str(data),
                           "--layers", "2.activ1", "--out", str(tmp_path / "v")]) == 0
    assert (tmp_path / "v" / "feature_maps_2_activ1.png").is_file()
    assert inspect.main([str(old_runs["speedrun"]), "--data-dir", str(data), "--images", "10",
                         "--layer", "2.activ1", "--out", str(tmp_path / "i")]) == 0
    assert (tmp_path / "i" / "feature_maps_2_activ1.png").is_file()


def test_evaluate_says_an_ensemble_is_reported_member_by_member(old_runs, tiny_cifar, capsys):
    assert evaluate.main(["--checkpoint", str(old_runs["sweep"]), "--data-dir", str(tiny_cifar),
                          "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "an ensemble of 4 members (a sweep): evaluate reports each member"
    assert out[0].startswith("tutorial (sw, after 1 epoch) on test of 20 images")
    members = json.loads(out[-1])["members"]
    assert [(m["lr"], m["seed"]) for m in members] == [(0.05, 0), (0.05, 1), (0.1, 0), (0.1, 1)]
    assert evaluate.main(["--checkpoint", str(old_runs["cifar"]), "--data-dir", str(tiny_cifar),
                          "--against", str(old_runs["sweep"])]) == 2
    err = _one_line_error(capsys)
    assert "--against: expected two single-net runs, got an ensemble's checkpoint" in err
    assert "holds an ensemble of 4 members (a sweep)" in err


def test_evaluate_of_an_old_speedrun_uses_its_stored_views(old_runs, tiny_cifar, capsys):
    assert evaluate.main(["--checkpoint", str(old_runs["speedrun"]), "--data-dir", str(tiny_cifar)]) == 0
    assert "tta_flip=True, tta_shift=1, tta_shift_weight=0.5" in capsys.readouterr().out.splitlines()[0]


def test_a_run_of_the_cifar_command_loads_and_evaluates_to_its_last_epochs_test_accuracy(
        cifar_folder, tmp_path, capsys):
    from experiments.cifar import cli

    data = cifar_folder(2, 2)
    assert cli.main("cifar_model_a", "A", ["--data-dir", str(data), "--out", str(tmp_path / "runs"), "--name", "a",
                               "--limit-per-class", "2", "--epochs", "1", "--batch-size", "10",
                               "--device", "cpu", "--no-bf16"]) == 0
    run = load_trained(tmp_path / "runs" / "a")
    assert run.what == "a CIFAR run of cifar_model_a" and run.config.name == "a" and run.epochs_done == 1
    assert run.views() == (run.config.tta_flip, 0, None, False, run.config.channels_last)
    last = [json.loads(r) for r in (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()][-1]
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(tmp_path / "runs" / "a"), "--data-dir", str(data), "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cifar_model_a (a, after 1 epoch) on test of 20 images")
    assert json.loads(out[-1])["accuracy"] == last["test_accuracy"]
