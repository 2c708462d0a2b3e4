"""python -m experiments.speedrun: the airbench94 recipe from purenn (docs/speedrun.md).

The whitening filters whiten, the net is airbench's (names, shapes, outputs against the torch.nn
twin of experiments/benchmarks/airbench_reference.py), a few pure steps equal airbench's torch
steps (parameter groups, rates, schedule, lookahead), the lookahead's math, the alternating
flip, the TTA, every ablation flag trains, a smoke run on real CIFAR-10 resumes bit for bit, and
bad flags are refused."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import layers
import nets
import optim
from experiments import evaluate, speedrun
from experiments.airbench import (RECIPE, SpeedrunConfig, alternating_flip, augmenter,
                                  derived_rates, lookahead_decay, lookahead_step, param_labels,
                                  parts, sync)
from experiments.train.lookahead import LookaheadState
from experiments.benchmarks.airbench_reference import ReferenceRun, reference_module, time_steps
from experiments.cifar.recipes import prepare
from experiments.common.settings import Difference
from experiments.data.dataset import Dataset
from experiments.train import fit, load_run, make_eval, make_step
from experiments.train.build import build_loss
from layers import random as jr
from nets.whitening import image_patches, patch_covariance, whitening_filters

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg"
SMALL = RECIPE.replace(widths=(8, 16, 16))


def _correlated_images(n=16, size=12, seed=0, dtype=torch.float64):
    """Images whose neighbouring pixels and channels are correlated (a blurred, mixed noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size + 2, size + 2, generator=g, dtype=dtype)
    x = F.avg_pool2d(x, 3, 1)                                      # neighbours share pixels
    mix = torch.tensor([[1.0, 0.5, 0.2], [0.3, 1.0, 0.4], [0.1, 0.6, 1.0]], dtype=dtype)
    return torch.einsum("dc,nchw->ndhw", mix, x) + 0.3


# ----------------------------------------------------------------------------- whitening


def test_patch_covariance_is_the_mean_outer_product_of_every_window():
    x = _correlated_images(n=3, size=5)
    rows = [x[n, :, i:i + 2, j:j + 2].reshape(-1) for n in range(3) for i in range(4) for j in range(4)]
    v = torch.stack(rows)
    torch.testing.assert_close(image_patches(x, 2), v)
    torch.testing.assert_close(patch_covariance(x, 2, chunk=2), v.T @ v / len(v))


def test_whitening_filters_whiten_the_patches_along_every_kept_direction():
    x = _correlated_images()
    eps = 1e-6
    w = whitening_filters(x, 2, eps=eps, dtype=torch.float64)
    assert w.shape == (24, 3, 2, 2)
    torch.testing.assert_close(w[12:], -w[:12])
    y = layers.conv2d({"weight": w[:12]}, x)                          # (N, 12, H - 1, W - 1)
    flat = y.permute(0, 2, 3, 1).reshape(-1, 12)
    second_moment = flat.T @ flat / len(flat)
    lam = torch.linalg.eigvalsh(patch_covariance(x, 2)).flip(0)
    torch.testing.assert_close(second_moment, torch.diag(lam / (lam + eps)), atol=1e-10, rtol=0)
    kept = lam > 100 * eps                                            # here: every direction
    assert kept.sum() >= 10
    torch.testing.assert_close(second_moment[kept][:, kept], torch.eye(int(kept.sum()), dtype=torch.float64),
                               atol=1e-2, rtol=0)


def test_whitening_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match=r"whitening_filters: expected eps > 0, got 0"):
        whitening_filters(_correlated_images(), eps=0)
    with pytest.raises(ValueError, match=r"patch_covariance: expected images \(N >= 1, C, H, W\) "
                                         r"with H, W >= kernel_size 2, got \(2, 3, 1, 5\)"):
        patch_covariance(torch.zeros(2, 3, 1, 5))


# ----------------------------------------------------------------------------- the net


def test_airbench_net_has_the_torch_modules_names_shapes_and_outputs():
    net = nets.airbench()
    params, state = net.init(jr.key(0))
    module = reference_module(RECIPE)
    ref = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in {**params, **state}.items()} == ref
    assert sum(v.numel() for v in params.values()) == sum(p.numel() for p in module.parameters()) == 1_972_792
    assert nets.summary(net, (2, 3, 32, 32)).rows[-1].output_shape == (2, 10)
    # airbench's init: the first in_channels filters of every conv are the identity
    eye = params["3.conv1.weight"][:64, :, 1, 1]
    assert torch.equal(eye, torch.eye(64)) and not params["3.conv1.weight"][64:].eq(0).all()
    small = nets.airbench(widths=SMALL.widths, whiten=torch.randn(24, 3, 2, 2, dtype=torch.float64))
    p, s = small.init(jr.key(1), dtype=torch.float64)
    m = reference_module(SMALL).double()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    for train in (True, False):
        m.train(train)
        ours, new_s = small.apply(p, s, x, train=train)
        buffers = {k: v.clone() for k, v in s.items()}
        theirs = torch.func.functional_call(m, {**p, **buffers}, (x,))
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"airbench: expected whitening filters \(24, 3, 2, 2\), got \(12, 3, 2, 2\)"):
        nets.airbench(whiten=torch.zeros(12, 3, 2, 2))


# ----------------------------------------------------------------------------- optimizer, lookahead


def test_parameter_groups_freeze_the_whitening_weight_and_the_batch_norm_scales():
    params = dict.fromkeys(["0.weight", "0.bias", "2.conv1.weight", "2.norm1.weight", "2.norm1.bias",
                            "7.weight"])
    assert param_labels(RECIPE)(params) == {
        "0.weight": "frozen", "0.bias": "whiten_bias", "2.conv1.weight": "other",
        "2.norm1.weight": "frozen", "2.norm1.bias": "norm_bias", "7.weight": "other"}
    ablated = param_labels(RECIPE.replace(whiten=False, bn_scale=True))(params)
    assert ablated["0.weight"] == "other" and ablated["2.norm1.weight"] == "other"
    rates = derived_rates(RECIPE)
    s = 1024 * (1 + 1 / 0.15)
    assert rates["other"][0] == pytest.approx(1024 * 11.5 / s)            # 1.5 at batch 1024
    # the decay per step, lr * wd, is airbench's wd * B / s in both groups
    for lr, wd in rates.values():
        assert lr * wd == pytest.approx(0.0153 * 1024 / s)


def test_triangular_schedule_is_airbenchs_get_lr():
    total = 47
    schedule = optim.triangular_schedule(2.0, total)
    ref = ReferenceRun(reference_module(SMALL), SMALL.replace(epochs=1), total)
    for t in range(total + 1):
        assert schedule(t) == pytest.approx(2.0 * ref._factor(t), rel=1e-14)
        assert float(schedule(torch.tensor(t))) == pytest.approx(schedule(t), rel=1e-14)
    assert (schedule(0), schedule(10), schedule(total)) == pytest.approx((0.4, 2.0, 0.14))


def test_pure_speedrun_steps_equal_airbenchs_torch_steps():
    """Groups, rates on the mean loss, Nesterov, schedule, whitening-bias cut, label smoothing and
    the lookahead: six float64 steps of both recipes land on the same weights."""
    cfg = SMALL.replace(epochs=2, batch_size=8, whiten_bias_epochs=1, lookahead_every=2,
                        bf16=False, channels_last=False)
    steps_per_epoch = 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (6, 8), generator=g)
    train = Dataset(torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.zeros(40, dtype=torch.int64), tuple(range(10)))
    net, opt, hooks = parts(cfg, train, steps_per_epoch)
    params, state = net.init(jr.key(3), dtype=torch.float64)
    module = reference_module(cfg).double()
    module.load_state_dict({**params, **state})
    ref = ReferenceRun(module, cfg, steps_per_epoch)
    opt_state = opt.init(params)
    step = hooks.wrap_step(make_step(net, opt, build_loss(cfg)))
    for i in range(6):
        params, state, opt_state, _ = step(params, state, opt_state, (x[i], y[i]), None)
        ref.step(x[i], y[i])
        theirs = module.state_dict()
        for k, v in {**params, **state}.items():
            torch.testing.assert_close(v, theirs[k], rtol=1e-9, atol=1e-11, msg=f"step {i + 1}, {k}")
    assert int(opt_state.count) == 6
    assert not torch.equal(params["0.bias"], torch.zeros_like(params["0.bias"]))


def test_lookahead_sync_is_a_lerp_towards_the_fast_weights_then_a_copy():
    slow_p, fast_p = {"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([2.0, 0.0])}
    slow_s = {"bn.running_mean": torch.tensor([1.0])}
    fast_s = {"bn.running_mean": torch.tensor([3.0]), "bn.num_batches_tracked": torch.tensor(7)}
    la = LookaheadState((), slow_p, slow_s, torch.tensor(5))
    p, s, la2 = sync(fast_p, fast_s, la, 0.25)
    # slow <- 0.25 slow + 0.75 fast; fast <- slow; the integer counter is left alone
    assert torch.equal(la2.slow_params["w"], torch.tensor([1.5, 1.0])) and torch.equal(p["w"], la2.slow_params["w"])
    assert torch.equal(s["bn.running_mean"], torch.tensor([2.5])) and int(s["bn.num_batches_tracked"]) == 7
    assert p["w"].data_ptr() != la2.slow_params["w"].data_ptr() and torch.equal(slow_p["w"], torch.tensor([0.0, 4.0]))
    assert lookahead_decay(5, 10) == pytest.approx(0.95 ** 5 / 8)
    # the wrapped step pulls at every 5th update and, at the last, takes the slow copy
    seen = []

    def inner(params, state, opt_state, batch, key):
        opt_state = opt_state._replace(count=opt_state.count + 1)
        return {"w": params["w"] + 1.0}, state, opt_state, {}

    step = lookahead_step(total_steps=12)(inner)
    params, state = {"w": torch.zeros(1)}, {}
    la = LookaheadState((), {"w": torch.zeros(1)}, {}, torch.tensor(0))
    for _ in range(12):
        before = la.slow_params["w"].clone()
        params, state, la, _ = step(params, state, la, None, None)
        seen.append(not torch.equal(before, la.slow_params["w"]))
    assert [i + 1 for i, moved in enumerate(seen) if moved] == [5, 10]
    assert torch.equal(params["w"], la.slow_params["w"])      # step 12: the weights are the slow copy


# ----------------------------------------------------------------------------- augmentation, TTA


def test_alternating_flip_mirrors_each_image_on_alternate_epochs():
    images = torch.randint(0, 256, (64, 3, 4, 5), dtype=torch.uint8)
    flips = alternating_flip(seed=3)
    e0, e1, e2, e3 = (flips(e, images) for e in range(4))
    mirrored0 = torch.tensor([torch.equal(e0[i], images[i].flip(-1)) for i in range(64)])
    assert torch.equal(e2, e0) and torch.equal(e3, e1)
    for i in range(64):
        assert torch.equal(e1[i], images[i] if mirrored0[i] else images[i].flip(-1))
    assert 16 < int(mirrored0.sum()) < 48                       # a fair coin per image, once per run
    assert not torch.equal(alternating_flip(seed=4)(0, images), e0)


def test_tta_is_airbenchs_weighted_mean_of_the_mirrored_and_translated_views():
    cfg = SMALL
    assert (cfg.tta_flip, cfg.tta_shift, cfg.tta_shift_weight) == (True, 1, 0.5)
    no_tta, _, _ = speedrun.requested_config(speedrun.build_parser().parse_args(["--no-tta"]))
    assert (no_tta.tta_flip, no_tta.tta_shift) == (False, 0)
    net = nets.airbench(widths=SMALL.widths)
    params, state = net.init(jr.key(0), dtype=torch.float64)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    predict = make_eval(net, tta_flip=cfg.tta_flip, tta_shift=cfg.tta_shift,
                        shift_weight=cfg.tta_shift_weight)
    f = lambda v: net.apply(params, state, v, train=False)[0]  # noqa: E731

    def shifted(v):                                             # moved by (1, 1) and (-1, -1)
        padded = F.pad(v, (1, 1, 1, 1), mode="reflect")
        return [padded[..., :32, :32], padded[..., 2:, 2:]]
    # airbench's weights: 1/2 on the unshifted pair, 1/2 on the four shifted views. (Its views
    # differ in one way, docs/speedrun.md: it mirrors the shifted images, we shift the mirror.)
    centre = (f(x) + f(x.flip(-1))) / 2
    moved = torch.stack([f(t) for v in (x, x.flip(-1)) for t in shifted(v)]).mean(0)
    # float64; the same six logits summed in another order
    torch.testing.assert_close(predict(params, state, x), 0.5 * centre + 0.5 * moved,
                               rtol=1e-12, atol=1e-12)
    # no weight (runs saved before it existed): every view 1/6
    views = [v for m in (x, x.flip(-1)) for v in (m, *shifted(m))]
    uniform = make_eval(net, tta_flip=True, tta_shift=1)
    torch.testing.assert_close(uniform(params, state, x), torch.stack([f(v) for v in views]).mean(0))
    with pytest.raises(ValueError, match=r"expected tta_shift_weight to be a number in \[0, 1\]"):
        make_eval(net, tta_flip=True, tta_shift=1, shift_weight=1.5)


# ----------------------------------------------------------------------------- every ablation trains


@pytest.mark.parametrize("change", [{}, {"whiten": False}, {"lookahead": False}, {"alt_flip": False},
                                    {"flip": False, "translate": 0, "tta_flip": False, "tta_shift": 0},
                                    {"activation": "relu", "label_smoothing": 0.0},
                                    {"bn_scale": True, "schedule": "constant", "nesterov": False}])
def test_every_ablation_of_the_recipe_trains(change):
    cfg = SMALL.replace(widths=(4, 8, 8), epochs=2, batch_size=8, bf16=False, channels_last=False,
                        lookahead_every=2, **change)
    g = torch.Generator().manual_seed(1)
    train = Dataset(torch.randint(0, 256, (24, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (24,), generator=g), tuple(range(10)))
    net, opt, hooks = parts(cfg, train, 3)
    result = fit(cfg, net=net, opt=opt, loss_fn=build_loss(cfg), train=train,
                 test=train, augment=augmenter(cfg), prepare=prepare, quiet=True, hooks=hooks)
    assert result.status == "done" and len(result.history) == 2
    assert all(torch.isfinite(v).all() for v in result.params.values())


# ----------------------------------------------------------------------------- the command


@pytest.mark.skipif(not (DATA / "train").is_dir(), reason="../shared/datasets/cifar10-jpeg is absent")
def test_smoke_run_on_real_cifar_writes_a_run_folder_and_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PURENN_CACHE", str(tmp_path / "cache"))
    argv = ["--data-dir", str(DATA), "--limit-per-class", "20", "--batch-size", "50", "--epochs", "2",
            "--widths", "8,16,16", "--out", str(tmp_path / "runs")]
    assert speedrun.main(argv + ["--name", "whole"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epoch"] == 2
    assert speedrun.main(argv + ["--name", "parts", "--max-epochs", "1"]) == 0
    assert speedrun.main(["--resume", str(tmp_path / "runs" / "parts")]) == 0
    whole, parts_ = tmp_path / "runs" / "whole", tmp_path / "runs" / "parts"
    assert {"config.json", "metrics.jsonl", "checkpoint.safetensors", "accuracy.png",
            "loss.png", "confusion.png"} <= {p.name for p in whole.iterdir()}
    cfg = json.loads((whole / "config.json").read_text())
    assert cfg["model"] == "airbench94" and cfg["tta_shift"] == 1 and cfg["widths"] == [8, 16, 16]
    (a, prog_a, _), (b, prog_b, _) = load_run(whole), load_run(parts_)
    assert prog_a == prog_b
    for name in ("params", "state", "opt_state"):
        for x, y in zip(torch.utils._pytree.tree_leaves(a[name]), torch.utils._pytree.tree_leaves(b[name])):
            assert torch.equal(x, y)
    rows_a = [json.loads(r) for r in (whole / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(r) for r in (parts_ / "metrics.jsonl").read_text().splitlines()]
    keys = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr")
    assert [{k: r[k] for k in keys} for r in rows_a] == [{k: r[k] for k in keys} for r in rows_b]
    # experiments.evaluate rebuilds the net from the run's config (TTA included)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(whole), "--data-dir", str(DATA), "--limit-per-class",
                          "20", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["accuracy"] == pytest.approx(rows_a[-1]["test_accuracy"])


def test_help_names_every_ablation_flag():
    text = speedrun.build_parser().format_help()
    for flag in ("--no-whiten", "--no-ema", "--no-alt-flip", "--no-flip", "--translate", "--no-tta",
                 "--label-smoothing", "--activation", "--bn-scale", "--schedule", "--no-nesterov",
                 "--whiten-bias-epochs", "--widths", "--resume", "--max-epochs"):
        assert flag in text, flag


@pytest.mark.parametrize("flags, needle", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--momentum", "1"], "--momentum"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--translate", "-1"], "--translate"),
    (["--translate", "16"], "--translate"),
    (["--widths", "64,x,256"], "--widths"),
    (["--widths", "64,256"], "--widths"),
    (["--whiten-bias-epochs", "-1"], "--whiten-bias-epochs"),
    (["--weight-decay=-1"], "--weight-decay"),
    (["--bias-scaler", "0"], "--bias-scaler"),
    (["--seed", "-2"], "--seed"),
    (["--device", "tpu"], "tpu"),
    (["--max-epochs", "0"], "--max-epochs"),
    (["--limit-per-class", "0"], "--limit-per-class"),
])
def test_a_bad_flag_is_one_line_and_exit_2_before_any_folder(flags, needle, tmp_path, capsys):
    assert speedrun.main(flags + ["--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    assert speedrun.main(["--resume", str(tmp_path / "nothing"), "--lr", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: expected a run folder with a checkpoint.safetensors")
    assert len(err.strip().splitlines()) == 1
    assert speedrun.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "nothing").exists()


# ----------------------------------------------------------------------------- the run lifecycle

TINY = ["--widths", "4,8,8", "--batch-size", "20", "--epochs", "2", "--no-bf16",
        "--no-channels-last", "--whiten-bias-epochs", "1"]


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def stopped_run(cifar_folder, tmp_path):
    """``(argv, run folder)`` of a speedrun stopped after 1 of 2 epochs on a generated CIFAR-10."""
    data = cifar_folder(4, 2)
    argv = TINY + ["--data-dir", str(data), "--out", str(tmp_path / "runs")]
    assert speedrun.main(argv + ["--name", "r", "--max-epochs", "1"]) == 0
    return argv, tmp_path / "runs" / "r"


@pytest.mark.parametrize("flags, named", [
    (["--epochs", "3"], [f"{Difference('epochs', 2, 3)} (its triangular schedule spans them"]),
    (["--lr", "2"], [str(Difference("lr", 11.5, 2.0))]),
    (["--limit-per-class", "2"], [str(Difference("limit_per_class", None, 2))]),
    (["--no-alt-flip", "--seed", "1"], [str(Difference("seed", 0, 1)), str(Difference("alt_flip", True, False))]),
])
def test_resume_with_a_changed_setting_is_refused_in_one_line_and_the_folder_is_untouched(
        stopped_run, flags, named, capsys):
    _, run = stopped_run
    before = _snapshot(run)
    capsys.readouterr()
    assert speedrun.main(["--resume", str(run)] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "holds a run trained with other settings" in err[0]
    for part in named:
        assert part in err[0], (part, err[0])
    assert _snapshot(run) == before


def test_a_rerun_into_a_folder_with_a_run_is_refused_and_names_the_resume_command(stopped_run, capsys):
    argv, run = stopped_run
    before = _snapshot(run)
    capsys.readouterr()
    assert speedrun.main(argv + ["--name", "r"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"python -m experiments.speedrun --resume {run}" in err[0]
    assert _snapshot(run) == before
    assert speedrun.main(argv + ["--name", "../escape"]) == 2
    assert "--name: expected a folder name inside --out" in capsys.readouterr().err


def test_resume_with_the_same_values_or_another_device_continues(stopped_run, capsys):
    _, run = stopped_run
    assert speedrun.main(["--resume", str(run), "--epochs", "2", "--device", "cpu", "--lr", "11.5"]) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((run / "config.json").read_text())["device"] == "cpu"


def test_more_epochs_of_a_constant_rate_run_without_lookahead_train_them(cifar_folder, tmp_path, capsys):
    data = cifar_folder(4, 2)
    argv = TINY + ["--data-dir", str(data), "--out", str(tmp_path / "runs"), "--name", "c",
                   "--schedule", "constant", "--no-lookahead"]
    assert speedrun.main(argv) == 0
    run = tmp_path / "runs" / "c"
    assert speedrun.main(["--resume", str(run), "--epochs", "3"]) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epoch"] == 3


def _old_format(cfg: SpeedrunConfig) -> dict:
    """The config the speedrun stored before the typed config: its recipe dict (``tta`` on/off,
    no trainer TTA keys) with ``fit_config``'s ``tta_flip`` / ``tta_shift`` derived from it."""
    old = {k: v for k, v in cfg.to_json().items() if k not in ("tta_flip", "tta_shift")}
    old["tta"] = cfg.tta_flip
    return {**old, "tta_flip": bool(old["tta"]), "tta_shift": 1 if old["tta"] else 0}


def test_a_speedrun_folder_written_before_the_typed_config_still_loads_and_resumes(stopped_run, capsys):
    from experiments.train.lifecycle import stored_config
    from experiments.train.runs import save_checkpoint

    _, run = stopped_run
    cfg, progress = stored_config(run, SpeedrunConfig)
    tree, progress, _ = load_run(run)
    old = _old_format(cfg)
    old.pop("tta_shift_weight")                     # older still: every view weighs the same
    (run / "config.json").write_text(json.dumps(old))
    save_checkpoint(run / "checkpoint.safetensors", tree["params"], tree["state"], tree["opt_state"],
                    tree["key"], progress, old)
    loaded, _ = stored_config(run, SpeedrunConfig)
    assert loaded == cfg.replace(tta_shift_weight=None)
    assert (loaded.tta_flip, loaded.tta_shift, loaded.widths) == (True, 1, (4, 8, 8))
    assert SpeedrunConfig.from_json(SpeedrunConfig.upgrade(dict(old, tta=False, tta_flip=False, tta_shift=0))).tta_shift == 0
    assert speedrun.main(["--resume", str(run)]) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "tta" not in json.loads((run / "config.json").read_text())


def test_config_json_round_trips_and_refuses_unknown_settings():
    cfg = RECIPE.replace(widths=(8, 16, 16), name="x", data_dir="/data")
    assert SpeedrunConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    with pytest.raises(ValueError, match="unknown crop"):
        SpeedrunConfig.from_json(dict(cfg.to_json(), crop=4))
    assert cfg.net_options() == dict(widths=[8, 16, 16], activation="gelu", bn_momentum=0.4,
                                     bn_eps=1e-12, scale=1 / 9)


def test_time_steps_times_the_pure_step_and_the_torch_twin_interleaved():
    out = time_steps(SMALL.replace(widths=(4, 8, 8), batch_size=16, bf16=False, channels_last=False),
                     steps=1, rounds=2)
    assert set(out) == {"pure", "torch.nn", "ratio"} and out["pure"] > 0 and out["torch.nn"] > 0
    assert out["ratio"] == pytest.approx(out["torch.nn"] / out["pure"])


# ----------------------------------------------------------------------------- the CPU recipe


def test_cpu_recipe_keeps_airbenchs_per_example_rates_and_horizons():
    from experiments.airbench import CPU_RECIPE, RECIPES
    cpu, b = CPU_RECIPE, CPU_RECIPE.batch_size
    assert RECIPES == {"airbench94": RECIPE, "cpu": CPU_RECIPE} and b < RECIPE.batch_size
    assert {d.name for d in cpu.differences(RECIPE)} == {
        "batch_size", "epochs", "bn_momentum", "lookahead_every", "eval_every_epoch"}
    assert cpu.epochs < RECIPE.epochs and not cpu.eval_every_epoch and RECIPE.eval_every_epoch
    # lr and weight decay are per 1024 examples: the same per example at any batch size
    for group in ("other", "norm_bias"):
        assert derived_rates(cpu)[group][0] / b == pytest.approx(derived_rates(RECIPE)[group][0] / 1024)
        assert derived_rates(cpu)[group][1] == derived_rates(RECIPE)[group][1]
    # the statistics that count steps keep their horizon in examples
    assert (1 - cpu.bn_momentum) ** (1024 / b) == pytest.approx(1 - RECIPE.bn_momentum, abs=1e-3)
    assert cpu.lookahead_every * b == RECIPE.lookahead_every * RECIPE.batch_size
    text = speedrun.build_parser().format_help()
    assert "--recipe" in text and "--eval-every-epoch" in text and "--bn-momentum" in text


def test_recipe_cpu_evaluates_once_after_the_last_epoch_as_evaluate_does(cifar_folder, tmp_path, capsys):
    data = cifar_folder(4, 2)
    argv = ["--recipe", "cpu", "--widths", "4,8,8", "--batch-size", "10", "--epochs", "2",
            "--val-split", "10", "--data-dir", str(data), "--out", str(tmp_path / "runs")]
    assert speedrun.main(argv) == 0
    run = tmp_path / "runs" / "speedrun-cpu-s0"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["eval_every_epoch"] is False and cfg["lookahead_every"] == 10 and cfg["batch_size"] == 10
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["test_accuracy"] is None and rows[0]["val_accuracy"] is None
    assert rows[1]["test_accuracy"] is not None and rows[1]["val_accuracy"] is not None
    assert rows[1]["eval_seconds"] > 0
    out = capsys.readouterr()
    assert "final evaluation: val_accuracy" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["test_accuracy"] == rows[1]["test_accuracy"]
    assert evaluate.main(["--checkpoint", str(run), "--data-dir", str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["accuracy"] == pytest.approx(rows[1]["test_accuracy"])


def test_recipe_with_resume_is_refused_in_one_line(stopped_run, capsys):
    _, run = stopped_run
    before = _snapshot(run)
    capsys.readouterr()
    assert speedrun.main(["--resume", str(run), "--recipe", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --recipe: expected none with --resume")
    assert _snapshot(run) == before


def test_time_batch_sizes_times_the_same_images_at_every_batch_size():
    from experiments.benchmarks.airbench_speed import time_batch_sizes
    cfg = SMALL.replace(widths=(4, 8, 8), bf16=False, channels_last=False)
    out = time_batch_sizes(cfg, (4, 8), rounds=2, images=8)
    assert set(out) == {4, 8}
    for row in out.values():
        assert len(row["all"]) == 2 and 0 < row["min"] <= row["median"]
    with pytest.raises(ValueError, match=r"time_configs: expected batch sizes that divide images=8, got 3"):
        time_batch_sizes(cfg, (3,), rounds=1, images=8)
