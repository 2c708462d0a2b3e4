"""experiments.train, the trainer: the pure step, eval, speed options, resume, NaN guard, Ctrl-C, outputs."""
import io
import json
import os
import signal
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import layers
import optim
from experiments import train as trainer
from experiments.cifar.config import CifarConfig
from experiments.report.plots import plot_run
from experiments.data.augment import augment_batch, normalize
from experiments.data.dataset import Dataset
from layers import random as jr
from nets.compose import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, as_net, serial

SEEDS = st.integers(0, 2**31 - 1)


def tiny_net(classes=3, p=0.25):
    """conv(3->4) - BN - ReLU - pool - dropout - linear: every kind of state the engine handles."""
    return as_net(serial(features=serial(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(),
                                         MaxPool2d(2), Dropout(p)),
                         classifier=serial(Flatten(), Linear(4 * 4 * 4, classes))), name="tiny")


def tiny_data(seed, n=48, classes=3, side=8):
    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8),
                   torch.arange(n) % classes, tuple(f"c{i}" for i in range(classes)))


def _batch(seed, n=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _equal_trees(a, b):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                            for x, y in zip(la, lb))


# --------------------------------------------------------------------------------------------
# The pure step


@settings(deadline=None, max_examples=15)
@given(seed=SEEDS, lr=st.floats(1e-3, 0.5))
def test_step_equals_autograd_sgd_update_and_new_bn_state(seed, lr):
    net = tiny_net()
    params, state = net.init(jr.key(seed), dtype=torch.float64)
    x, y = _batch(seed)
    key = jr.key(seed + 1)
    loss_fn = layers.cross_entropy
    step = trainer.make_step(net, optim.sgd(lr), loss_fn)
    new_p, new_s, _, metrics = step(params, state, optim.sgd(lr).init(params), (x, y), key)
    # reference: autograd through the same apply on leaf copies
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    logits, ref_state = net.apply(leaves, state, x, train=True, key=key)
    loss = loss_fn(logits, y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    # float64, a handful of ops of size <= 256: only rounding-order differences remain
    for (k, p), g in zip(params.items(), grads):
        torch.testing.assert_close(new_p[k], p - lr * g, rtol=1e-12, atol=1e-12)
    for k in ref_state:
        torch.testing.assert_close(new_s[k], ref_state[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=1e-12, atol=0)
    assert int(metrics["correct"]) == int((logits.argmax(1) == y).sum())


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS)
def test_step_is_pure_same_inputs_same_outputs_inputs_untouched(seed):
    net = tiny_net()
    params, state = net.init(jr.key(seed), dtype=torch.float64)
    opt = optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    opt_state = opt.init(params)
    batch, key = _batch(seed), jr.key(seed)
    before = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                             (params, state, opt_state, batch, key))
    step = trainer.make_step(net, opt, layers.cross_entropy)
    a = step(params, state, opt_state, batch, key)
    b = step(params, state, opt_state, batch, key)
    assert _equal_trees(a, b)
    assert _equal_trees((params, state, opt_state, batch, key), before)


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS)
def test_eval_with_flip_tta_averages_the_logits_of_image_and_mirror(seed):
    net = tiny_net()
    params, state = net.init(jr.key(seed), dtype=torch.float64)
    x, _ = _batch(seed)
    plain = trainer.make_eval(net)(params, state, x)
    mirror = trainer.make_eval(net)(params, state, x.flip(-1))
    tta = trainer.make_eval(net, tta_flip=True)(params, state, x)
    torch.testing.assert_close(tta, (plain + mirror) / 2, rtol=0, atol=0)
    ref, _ = net.apply(params, state, x, train=False)
    assert torch.equal(plain, ref)


@settings(deadline=None, max_examples=20)
@given(seed=SEEDS, dy=st.integers(-3, 3), dx=st.integers(-3, 3))
def test_translate_moves_every_pixel_and_reflects_at_the_border(seed, dy, dx):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    out = trainer.translate(x, dy, dx)
    assert out.shape == x.shape
    for i in range(8):
        for j in range(8):
            # reflection about the edge pixel: index -1 -> 1, index 8 -> 6
            si, sj = [abs(k) if k < 0 else (2 * 7 - k if k > 7 else k) for k in (i - dy, j - dx)]
            assert torch.equal(out[..., i, j], x[..., si, sj]), (i, j)


def test_translate_by_zero_is_the_input_and_too_far_is_refused():
    x = torch.randn(1, 3, 4, 4)
    assert trainer.translate(x, 0, 0) is x
    with pytest.raises(ValueError, match=r"translate: expected shifts smaller than the image \(4x4\), got \(4, 0\)"):
        trainer.translate(x, 4, 0)


def test_tta_views_and_bad_shifts():
    assert trainer.tta_views() == [(False, 0, 0)]
    assert trainer.tta_views(tta_flip=True) == [(False, 0, 0), (True, 0, 0)]
    assert trainer.tta_views(tta_flip=True, tta_shift=2) == [
        (False, 0, 0), (False, 2, 2), (False, -2, -2), (True, 0, 0), (True, 2, 2), (True, -2, -2)]
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="expected tta_shift to be a whole number of pixels >= 0, got"):
            trainer.make_eval(tiny_net(), tta_shift=bad)


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS, flip=st.booleans(), shift=st.integers(1, 2))
def test_eval_with_shift_tta_averages_the_logits_of_every_view(seed, flip, shift):
    net = tiny_net()
    params, state = net.init(jr.key(seed), dtype=torch.float64)
    x, _ = _batch(seed)
    plain = trainer.make_eval(net)
    views = [plain(params, state, trainer.translate(x.flip(-1) if m else x, dy, dx))
             for m, dy, dx in trainer.tta_views(flip, shift)]
    assert len(views) == (6 if flip else 3)
    tta = trainer.make_eval(net, tta_flip=flip, tta_shift=shift)(params, state, x)
    # the same sum in the same order, then one division: exact
    torch.testing.assert_close(tta, sum(views[1:], views[0]) / len(views), rtol=0, atol=0)


def test_evaluate_confusion_accuracy_and_loss_match_a_direct_computation():
    net = tiny_net()
    params, state = net.init(jr.key(0))
    data = tiny_data(1, n=37)
    predict = trainer.make_eval(net)
    res = trainer.evaluate(predict, params, state, data, device=torch.device("cpu"), batch_size=10,
                           prepare=normalize)
    logits = predict(params, state, normalize(data.images))
    pred = logits.argmax(1)
    assert torch.equal(res.predictions, pred)
    assert res.accuracy == (pred == data.labels).double().mean().item()
    # float32 sums of 37 per-image losses in 4 batches vs one batch: ~1e-7 relative
    assert res.loss == pytest.approx(layers.cross_entropy(logits, data.labels).item(), rel=1e-5)
    assert res.confusion.sum() == 37
    for t in range(3):
        for p in range(3):
            assert res.confusion[t, p] == int(((data.labels == t) & (pred == p)).sum())


# --------------------------------------------------------------------------------------------
# Speed options agree with eager fp32


def _run_steps(n, lr=0.05, **opts):
    net = tiny_net(p=0.0)
    params, state = net.init(jr.key(0))
    opt = optim.sgd(lr, momentum=0.9)
    opt_state = opt.init(params)
    if opts.get("channels_last"):
        params, opt_state = trainer.to_channels_last(params), trainer.to_channels_last(opt_state)
    step = trainer.make_step(net, opt, layers.cross_entropy, **opts)
    losses = []
    for i in range(n):
        x, y = _batch(i, n=16, dtype=torch.float32)
        params, state, opt_state, m = step(params, state, opt_state, (x, y), jr.key(i))
        losses.append(m["loss"])
    return params, torch.stack(losses)


def test_channels_last_matches_eager_fp32():
    p0, l0 = _run_steps(4)
    p1, l1 = _run_steps(4, channels_last=True)
    # float32, same math with another memory layout: only summation order differs (~1e-6)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_matches_eager_fp32_within_bf16_tolerance():
    p0, l0 = _run_steps(4)
    p1, l1 = _run_steps(4, bf16=True, channels_last=True)
    # bfloat16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4%); conv outputs of 27-term
    # sums and 4 SGD steps compound to about 1-2%: 3% relative on the loss, 2e-2 on parameters
    # of magnitude ~0.3.
    torch.testing.assert_close(l1, l0, rtol=3e-2, atol=3e-2)
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=5e-2, atol=2e-2)


def test_compiled_step_matches_eager_fp32_and_compiles_once_under_a_schedule():
    # A one-cycle schedule changes the learning rate every step; only the forward and backward
    # are compiled, so the changing rate must never trigger a recompile (error_on_recompile).
    torch._dynamo.reset()
    schedule = optim.one_cycle_schedule(0.05, 3, pct_start=0.5)
    p0, l0 = _run_steps(3, lr=schedule)
    with torch._dynamo.config.patch(error_on_recompile=True):
        p1, l1 = _run_steps(3, lr=schedule, compile=True)
    # inductor fuses and reorders float32 reductions: ~1e-6 relative per op
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The epoch loop


CFG = CifarConfig(seed=3, epochs=2, batch_size=12, device="cpu", bf16=False, channels_last=False,
                  crop=2, flip=True, tta_flip=True, eval_batch_size=16, model="cifar_model_b",
                  name="t")


def _fit(run_dir, cfg=CFG, lr=0.05, loss_fn=layers.cross_entropy, resume=False, guarded=False, **kw):
    train, test = tiny_data(0), tiny_data(1, n=20)
    steps = len(train.labels) // cfg.batch_size
    opt = optim.sgd(optim.one_cycle_schedule(lr, cfg.epochs * steps), momentum=0.9,
                    nesterov=True, weight_decay=5e-4,
                    weight_decay_mask=optim.decay_mask_no_bias_or_norm)
    stream = io.StringIO()
    augment = partial(augment_batch, crop=cfg.crop, flip=cfg.flip)
    run = trainer.open_run(run_dir, cfg, command="python -m tests.fit", resume=resume)
    run.after_epoch.append(plot_run)
    train_it = lambda: trainer.fit(cfg, net=tiny_net(), opt=opt, loss_fn=loss_fn, train=train,  # noqa: E731
                                   val=test, test=test, augment=augment, prepare=normalize,
                                   run=run, stream=stream, **kw)
    if guarded:
        res, code = run.guarded(train_it, stream=stream)
        return (res, code), stream.getvalue()
    return train_it(), stream.getvalue()


def test_fit_writes_every_output_file_and_one_metrics_line_per_epoch(tmp_path):
    res, log = _fit(tmp_path / "run")
    assert res.status == "done"
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "metrics.jsonl", "accuracy.png", "loss.png", "confusion.png",
            trainer.CHECKPOINT} <= files
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
                  "test_accuracy", "lr", "seconds"):
            assert isinstance(r[k], float), k
    assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == 3
    assert "train_loss" in log and "epoch 2/2" in log  # final table and per-epoch lines
    tree, progress, cfg = trainer.load_run(tmp_path / "run")
    assert progress["epoch"] == 2 and progress["step"] == 0 and cfg == CFG.to_json()
    assert _equal_trees(tree["params"], res.params)


@pytest.mark.parametrize("speed", [{}, {"bf16": True, "channels_last": True}], ids=["fp32", "bf16_cl"])
def test_resume_after_max_epochs_is_bit_identical_to_an_uninterrupted_run(tmp_path, speed):
    cfg = CFG.replace(**speed)
    full, _ = _fit(tmp_path / "full", cfg)
    stopped, _ = _fit(tmp_path / "part", cfg, max_epochs=1)
    assert stopped.status == "stopped"
    resumed, log = _fit(tmp_path / "part", cfg, resume=True)
    assert "resuming" in log
    assert _equal_trees(resumed.params, full.params)
    assert _equal_trees(resumed.state, full.state)
    assert _equal_trees(resumed.opt_state, full.opt_state)
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)


def test_ctrl_c_mid_epoch_saves_a_checkpoint_and_resume_is_bit_identical(tmp_path):
    full, _ = _fit(tmp_path / "full")

    def interrupt(epoch, step):
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt

    (cut, code), log = _fit(tmp_path / "cut", on_step=interrupt, guarded=True)
    assert cut.status == "interrupted" and code == 130
    # the lifecycle names the command that continues the run
    assert f"resume with: python -m tests.fit --resume {tmp_path / 'cut'}" in log
    _, progress, _ = trainer.load_run(tmp_path / "cut")
    assert (progress["epoch"], progress["step"]) == (1, 2)
    resumed, _ = _fit(tmp_path / "cut", resume=True)
    assert _equal_trees(resumed.params, full.params)
    assert _equal_trees(resumed.opt_state, full.opt_state)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]


def test_ctrl_c_inside_a_donated_step_waits_for_it_and_resume_is_bit_identical(tmp_path):
    full, _ = _fit(tmp_path / "full")
    calls = []

    def loss_hit_by_ctrl_c(logits, y):
        calls.append(1)
        if len(calls) == 4:   # the 4th and last step of epoch 1, before its donated update
            os.kill(os.getpid(), signal.SIGINT)
        return layers.cross_entropy(logits, y)

    (cut, code), _ = _fit(tmp_path / "cut", loss_fn=loss_hit_by_ctrl_c, guarded=True)
    assert cut.status == "interrupted" and code == 130
    _, progress, _ = trainer.load_run(tmp_path / "cut")
    assert (progress["epoch"], progress["step"]) == (0, 4)   # the step finished, then it stopped
    resumed, _ = _fit(tmp_path / "cut", resume=True)
    assert _equal_trees(resumed.params, full.params)
    assert _equal_trees(resumed.opt_state, full.opt_state)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    _fit(tmp_path / "run", max_epochs=1)
    ckpt = tmp_path / "run" / trainer.CHECKPOINT
    good = ckpt.read_bytes()
    nan_loss = lambda logits, y: layers.cross_entropy(logits, y) * float("nan")  # noqa: E731
    with pytest.raises(trainer.NonFiniteLossError, match="finite training loss, got nan at epoch 2, batch 0"):
        _fit(tmp_path / "run", resume=True, loss_fn=nan_loss)
    assert ckpt.read_bytes() == good


def test_huge_learning_rate_trips_the_guard_and_leaves_the_initial_checkpoint(tmp_path):
    with pytest.raises(trainer.NonFiniteLossError, match="last good checkpoint"):
        _fit(tmp_path / "run", lr=1e30)
    tree, progress, _ = trainer.load_run(tmp_path / "run")
    params, _ = tiny_net().init(trainer.run_keys(CFG.seed).init)
    assert progress["epoch"] == 0 and _equal_trees(tree["params"], params)
    assert all(torch.isfinite(v).all() for v in tree["params"].values())


def test_run_keys_are_distinct_and_depend_on_the_seed():
    a, b = trainer.run_keys(0), trainer.run_keys(1)
    assert len({tuple(v.tolist()) for v in a}) == 3
    assert not torch.equal(a.train, b.train)


@settings(max_examples=15, deadline=None)
@given(seeds=st.lists(st.integers(0, 2**40), min_size=1, max_size=4), epoch=st.integers(0, 2**33),
       steps=st.integers(1, 9), members=st.booleans())
def test_an_epochs_step_keys_drawn_at_once_are_the_bits_of_each_steps_own(seeds, epoch, steps, members):
    # the trainer draws an epoch's keys in one vmapped pass (keys.epoch_step_keys); every draw
    # of a run must stay a function of (seed, epoch, step) alone, so the bits must be the same
    from experiments.train.keys import epoch_step_keys, step_keys
    keys = [trainer.run_keys(s).train for s in seeds]
    if members:
        got = epoch_step_keys(torch.stack(keys), epoch, steps)
        assert got.augment.shape == got.dropout.shape == (steps, len(keys), 2)
        for s in range(steps):
            for k, key in enumerate(keys):
                want = step_keys(key, epoch, s)
                assert torch.equal(got.augment[s, k], want.augment) and torch.equal(got.dropout[s, k], want.dropout)
    else:
        got = epoch_step_keys(keys[0], epoch, steps)
        assert got.augment.shape == got.dropout.shape == (steps, 2)
        for s in range(steps):
            want = step_keys(keys[0], epoch, s)
            assert torch.equal(got.augment[s], want.augment) and torch.equal(got.dropout[s], want.dropout)


# --------------------------------------------------------------------------------------------
# Progress bar and devices


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_redraws_with_carriage_return_on_a_tty():
    s = _Tty()
    bar = trainer.ProgressBar(10, "epoch 1/1", stream=s, interval=0.0)
    for i in range(1, 11):
        bar.update(i, 32 * i, loss=1.5, acc=0.25)
    bar.close("done line")
    out = s.getvalue()
    assert out.count("\r") >= 10 and "img/s" in out and "ETA" in out and "loss 1.5000" in out
    assert "acc 25.00%" in out and out.endswith("done line\n")


def test_progress_bar_is_quiet_off_a_tty_except_the_closing_line():
    s = io.StringIO()
    bar = trainer.ProgressBar(10, "epoch 1/1", stream=s, interval=0.0)
    for i in range(1, 11):
        bar.update(i, 32 * i, loss=1.5)
    bar.close("epoch 1/1: loss 1.5")
    assert s.getvalue() == "epoch 1/1: loss 1.5\n"


def test_resolve_device_auto_and_errors():
    assert trainer.resolve_device("cpu") == torch.device("cpu")
    assert trainer.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            trainer.resolve_device("cuda")
