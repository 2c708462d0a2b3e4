"""The speedrun's tricks as options of the CIFAR recipes (issue 18, item 4): whitening as the
first convolution's initialisation, batch-norm momentum and epsilon, and the lookahead in the
one trainer; their values through the command line and a bit-identical resume."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layers
import nets
from experiments.cifar import cli
from experiments.cifar.config import CifarConfig
from experiments.cifar.recipes import FIRST_CONV, build_net, whitening_images
from experiments.train.hooks import FitHooks
from experiments.train.lookahead import LookaheadState, with_lookahead
from layers import random as jr
from nets.whitening import patch_covariance, whitened_init, whitened_weight, whitening_filters
from reference_modules import model_b_module, reference_call


def _images(n=6, size=8, seed=0):
    """Correlated float64 images: smooth noise, so the 3x3 patch covariance is far from identity."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size + 2, size + 2, generator=g, dtype=torch.float64)
    x = (x[..., 1:, :] + x[..., :-1, :])[..., :, 1:] + (x[..., 1:, :] + x[..., :-1, :])[..., :, :-1]
    return x[..., :size, :size] + 0.5 * x[:, :1, :size, :size]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(out_channels=st.sampled_from([2, 8, 54, 64]), seed=st.integers(0, 2 ** 16))
def test_whitened_weight_puts_whitening_directions_first_at_the_inits_norm(out_channels, seed):
    x = _images(seed=seed)
    filters = whitening_filters(x, 3, eps=1e-6, dtype=torch.float64)         # (54, 3, 3, 3)
    weight = torch.randn(out_channels, 3, 3, 3, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(seed))
    w = whitened_weight(weight, filters)
    m = min(27, out_channels // 2)
    assert w.shape == weight.shape and w.dtype == weight.dtype
    assert torch.equal(w[2 * m:], weight[2 * m:])                # the rest keeps its init
    torch.testing.assert_close(w[m:2 * m], -w[:m])              # both signs of each direction
    # the init's norm (so the layer's effective SGD rate is unchanged); float64 rounding only
    torch.testing.assert_close(w[:2 * m].norm(), weight[:2 * m].norm(), rtol=1e-12, atol=0)
    # the first m channels are the top-m whitening directions, scaled: their outputs on every
    # 3x3 window are uncorrelated, with second moments in the ratio lambda_d / (lambda_d + eps)
    y = layers.conv2d({"weight": w[:m]}, x).permute(0, 2, 3, 1).reshape(-1, m)
    second = y.T @ y / len(y)
    lam = torch.linalg.eigvalsh(patch_covariance(x, 3)).flip(0)[:m]
    gain = lam / (lam + 1e-6)
    torch.testing.assert_close(second / second[0, 0], torch.diag(gain / gain[0]), atol=1e-9, rtol=1e-9)


def test_whitened_weight_refuses_mismatched_shapes():
    filters = whitening_filters(_images().float(), 3)
    with pytest.raises(ValueError, match=r"whitened_weight: expected weight \(O, C, k, k\) and "
                                         r"filters .* got \(8, 3, 5, 5\) and \(54, 3, 3, 3\)"):
        whitened_weight(torch.zeros(8, 3, 5, 5), filters)
    with pytest.raises(ValueError, match=r"at least 2 output channels, got \(1, 3, 3, 3\)"):
        whitened_weight(torch.zeros(1, 3, 3, 3), filters)
    with pytest.raises(TypeError, match="whitened_init: expected a nets.Net, got int"):
        whitened_init(3, FIRST_CONV, filters)
    with pytest.raises(ValueError, match="whitened_init: expected a parameter 'conv.weight'"):
        whitened_init(nets.model_b(), "conv.weight", filters).init(jr.key(0))


def test_whitened_init_changes_only_the_first_conv_and_follows_the_key():
    filters = whitening_filters(_images().float(), 3)
    plain = nets.model_b()
    net = whitened_init(plain, FIRST_CONV, filters)
    for seed in (0, 1):
        p0, s0 = plain.init(jr.key(seed))
        p1, s1 = net.init(jr.key(seed))
        assert sorted(p0) == sorted(p1)
        assert all(torch.equal(p0[k], p1[k]) for k in p0 if k != FIRST_CONV)
        assert all(torch.equal(s0[k], s1[k]) for k in s0)
        assert not torch.equal(p0[FIRST_CONV][:54], p1[FIRST_CONV][:54])
        assert torch.equal(p0[FIRST_CONV][54:], p1[FIRST_CONV][54:])
    assert net.apply is plain.apply


def test_recipe_builds_the_whitened_net_from_the_training_images_only_when_asked():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8)
    cfg = CifarConfig(model="cifar_model_b", whiten_init=True, whiten_images=10, whiten_eps=5e-4)
    chosen = whitening_images(images, 10)
    assert chosen.shape == (10, 3, 32, 32) and chosen.dtype == torch.float32
    expected = whitened_weight(nets.model_b().init(jr.key(0))[0][FIRST_CONV],
                               whitening_filters(chosen, 3, eps=5e-4))
    assert torch.equal(build_net(cfg, 10, images).init(jr.key(0))[0][FIRST_CONV], expected)
    plain = nets.model_b().init(jr.key(0))[0][FIRST_CONV]
    # no images (a resumed run: the weights come from its checkpoint), or the option off
    assert torch.equal(build_net(cfg, 10, None).init(jr.key(0))[0][FIRST_CONV], plain)
    assert torch.equal(build_net(cfg.replace(whiten_init=False), 10, images).init(jr.key(0))[0][FIRST_CONV],
                       plain)


@pytest.mark.parametrize("momentum,eps", [(0.4, 1e-12), (0.9, 1e-3)])
def test_batch_norm_settings_reach_every_batch_norm_as_torch_nn_would(momentum, eps):
    net = nets.model_b(dropout=0.0, head_dropout=0.0, bn_momentum=momentum, bn_eps=eps)
    params, state = net.init(jr.key(1))
    params = {k: v.double() for k, v in params.items()}
    state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    module = model_b_module().double()
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum, bn.eps = momentum, eps
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # float64, the same formula in both: only summation order differs (~1e-15 relative)
    for train in (True, False):
        out, new_state = net.apply(params, state, x, train=train)
        ref, ref_state = reference_call(module, params, state, x, train=train)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for k in state:
            torch.testing.assert_close(new_state[k], ref_state[k], rtol=1e-10, atol=1e-12)


def test_with_lookahead_wraps_the_optimizer_and_composes_with_an_existing_step_wrapper():
    import optim
    net = nets.model_b()
    calls = []

    def outer(step):
        def wrapped(*args):
            calls.append("outer")
            return step(*args)
        return wrapped
    opt, hooks = with_lookahead(net, optim.sgd(0.1), total_steps=4, every=2,
                                hooks=FitHooks(wrap_step=outer, epoch_images="kept"))
    assert hooks.epoch_images == "kept"
    params, state = net.init(jr.key(0))
    opt_state = opt.init(params)
    assert isinstance(opt_state, LookaheadState)

    def step(params, state, opt_state, batch, key):
        grads = {k: torch.ones_like(v) for k, v in params.items()}
        updates, opt_state = opt.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), state, opt_state, {}
    run = hooks.wrap_step(step)
    p, s, o = params, state, opt_state
    for i in range(4):
        p, s, o, _ = run(p, s, o, None, None)
    assert calls == ["outer"] * 4 and int(o.count) == 4
    # after the last update the weights are the slow copy
    assert all(torch.equal(p[k], o.slow_params[k]) for k in p)


def test_tricks_through_the_command_line_record_their_values_and_resume_bit_identically(
        tiny_cifar, tmp_path, capsys):
    argv = ["--data-dir", str(tiny_cifar), "--epochs", "2", "--batch-size", "20", "--val-split", "0",
            "--out", str(tmp_path / "runs"), "--no-bf16", "--no-channels-last", "--seed", "4",
            "--lookahead", "--lookahead-every", "2", "--whiten-init", "--bn-momentum", "0.4",
            "--bn-eps", "1e-12", "--label-smoothing", "0.2", "--tta-shift", "1"]
    assert cli.main("cifar_model_b", "B", argv + ["--name", "whole"]) == 0
    assert cli.main("cifar_model_b", "B", argv + ["--name", "split", "--max-epochs", "1"]) == 0
    assert cli.main("cifar_model_b", "B", ["--resume", str(tmp_path / "runs" / "split")]) == 0
    cfg = json.loads((tmp_path / "runs" / "whole" / "config.json").read_text())
    assert (cfg["lookahead"], cfg["lookahead_every"], cfg["whiten_init"], cfg["bn_momentum"],
            cfg["bn_eps"], cfg["label_smoothing"], cfg["tta_shift"]) == (True, 2, True, 0.4, 1e-12, 0.2, 1)
    whole = nets.load(tmp_path / "runs" / "whole" / "checkpoint.safetensors")[0]
    split = nets.load(tmp_path / "runs" / "split" / "checkpoint.safetensors")[0]
    assert sorted(whole["params"]) == sorted(split["params"])
    assert all(torch.equal(whole["params"][k], split["params"][k]) for k in whole["params"])
    assert all(torch.equal(whole["state"][k], split["state"][k]) for k in whole["state"])
    # 2 epochs of 3 steps, a pull every 2: the slow copy rides in the optimizer state, and the
    # run ends on it (the last update makes the weights the slow copy)
    slow = whole["opt_state"]
    assert int(slow["count"]) == 6
    assert all(torch.equal(whole["params"][k], slow["slow_params"][k]) for k in whole["params"])
    capsys.readouterr()
    # the lookahead's decay spans the planned epochs: extending a run is refused
    report = argv + ["--recipe", "report", "--name", "const", "--max-epochs", "1"]
    assert cli.main("cifar_model_b", "B", report) == 0
    capsys.readouterr()
    assert cli.main("cifar_model_b", "B", ["--resume", str(tmp_path / "runs" / "const"),
                                           "--epochs", "3"]) == 2
    assert "its lookahead decay spans them" in capsys.readouterr().err


@pytest.mark.parametrize("flags,needle", [
    (["--bn-momentum", "1.5"], "--bn-momentum: expected a finite number in [0, 1], got 1.5"),
    (["--bn-eps", "0"], "--bn-eps: expected a finite number in (0, inf), got 0.0"),
    (["--lookahead-every", "0"], "--lookahead-every: expected a whole number >= 1, got 0"),
])
def test_bad_trick_values_are_one_line_and_exit_2_before_any_folder(flags, needle, tmp_path, capsys):
    assert cli.main("cifar_model_b", "B", flags + ["--out", str(tmp_path / "runs")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
