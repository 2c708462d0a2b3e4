"""Specification of nets.jax_apply: a net's apply as a jitted, differentiable JAX function that
equals the torch run, batch-norm running statistics included.

Needs the optional extra ``purenn[torchax]`` (jax, optax, torchax); skipped only when it is
absent. The nets here are small members of the Model B / C family (every layer type of Models
B and C: conv, batch norm, ReLU, max-pool, dropout, global average pool, linear) so that each
compilation takes a second or two; the last test runs experiments.jax_train's library (Model B,
optax in jax.jit) on a synthetic data set against the torch step.

Importing torchax changes torch for the rest of the process (it renames the ``privateuse1``
backend to ``"jax"``, which torch then takes for the current accelerator: ``torch.compile`` and
``torch.random.fork_rng`` fail afterwards). So the suite runs in a process of its own: in the
test session it is one test, which runs this file again with ``PURENN_TORCHAX_PROCESS=1``.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layers
import nets
from jax_support import x64
from nets import from_jax, to_jax

HAVE_TORCHAX = all(importlib.util.find_spec(m) for m in ("jax", "optax", "torchax"))
needs_torchax = pytest.mark.skipif(not HAVE_TORCHAX, reason="the extra purenn[torchax] is not installed")
IN_OWN_PROCESS = os.environ.get("PURENN_TORCHAX_PROCESS") == "1"


def in_own_process(test):
    """Collected only in the process of test_torchax_suite_passes_in_a_process_of_its_own."""
    test.__test__ = IN_OWN_PROCESS
    return test


@needs_torchax
def test_torchax_suite_passes_in_a_process_of_its_own():
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                          str(Path(__file__).resolve())], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PURENN_TORCHAX_PROCESS": "1"})
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print(f"test_jax_apply.py in its own process: {summary}")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "skipped" not in summary, summary


test_torchax_suite_passes_in_a_process_of_its_own.__test__ = not IN_OWN_PROCESS


# float64: the same torch operations lowered to XLA, summed in XLA's order: logits and gradients
# agree to ~1e-15 (measured, docs/jax.md); a conv of <= 8 * 9 products per output, through four
# layers, stays far below 1e-11, while any real difference (a wrong mask, statistic or key) is O(1).
TOL = dict(rtol=1e-11, atol=1e-11)


@pytest.fixture(scope="module")
def jax():
    if not HAVE_TORCHAX:
        pytest.skip("the extra purenn[torchax] is not installed")
    import jax
    with x64(jax):
        yield jax


def small_net():
    return nets.vgg_like(((4,), (6, 8)), num_classes=3, dropout=0.3, head_dropout=0.2, name="small")


def setup(seed, dtype=torch.float64):
    net = small_net()
    params, state = net.init(layers.random.key(seed), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, dtype=dtype, generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    # Running statistics away from their initial values, so the update is visible.
    state = {k: v + 0.5 if v.is_floating_point() else v + 3 for k, v in state.items()}
    return net, params, state, x, y


def assert_trees_close(got, want, **tol):
    assert sorted(got) == sorted(want)   # jax.jit hands dicts back in sorted key order
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], **tol, msg=k)


# ------------------------------------------------------------------------- without torchax


def test_without_torchax_jax_apply_raises_import_error_naming_the_extra(monkeypatch):
    from nets.jax_torchax import jax_apply
    monkeypatch.setitem(sys.modules, "torchax", None)   # makes `import torchax` fail
    with pytest.raises(ImportError) as info:
        jax_apply(small_net())
    assert "pip install 'purenn[torchax]'" in str(info.value) and "jax_apply" in str(info.value)


# ---------------------------------------------------------------------------- with torchax


@in_own_process
@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_jitted_train_step_equals_torch_logits_running_statistics_and_gradients(jax, impl):
    net, params, state, x, y = setup(0)
    key = layers.random.key(5)

    def loss(params, state, x, key):   # the same function of torch tensors or torchax ones
        logits, new_state = net.apply(params, state, x, train=True, key=key)
        return layers.cross_entropy(logits, y, label_smoothing=0.1), (logits, new_state)

    with layers.default_impl(impl):
        grads, (value, (logits, new_state)) = torch.func.grad_and_value(loss, has_aux=True)(
            params, state, x, key)

    apply = nets.jax_apply(net, impl=impl)
    import optax

    @jax.jit
    def jax_loss_and_grad(params, state, x, y, key):
        def f(params):
            logits, new_state = apply(params, state, x, train=True, key=key)
            smooth = optax.smooth_labels(jax.nn.one_hot(y, 3), 0.1)
            return optax.softmax_cross_entropy(logits, smooth).mean(), (logits, new_state)
        return jax.value_and_grad(f, has_aux=True)(params)

    (j_value, (j_logits, j_state)), j_grads = jax_loss_and_grad(*to_jax((params, state, x, y, key)))
    torch.testing.assert_close(from_jax(j_logits), logits, **TOL)
    torch.testing.assert_close(from_jax(j_value), value, **TOL)
    assert_trees_close(from_jax(j_state), new_state, **TOL)
    assert_trees_close(from_jax(j_grads), grads, **TOL)
    assert not torch.equal(new_state["features.1.running_mean"], state["features.1.running_mean"])


@in_own_process
def test_eval_leaves_the_state_unchanged_and_equals_torch(jax):
    net, params, state, x, _ = setup(1)
    logits, new_state = net.apply(params, state, x, train=False)
    apply = jax.jit(nets.jax_apply(net), static_argnames="train")
    j_logits, j_state = apply(*to_jax((params, state, x)), train=False)
    torch.testing.assert_close(from_jax(j_logits), logits, **TOL)
    assert_trees_close(from_jax(j_state), state, rtol=0, atol=0)


@in_own_process
def test_float32_train_step_equals_torch_to_float32_rounding(jax):
    net, params, state, x, _ = setup(2, torch.float32)
    key = layers.random.key(3)
    logits, new_state = net.apply(params, state, x, train=True, key=key)
    apply = jax.jit(nets.jax_apply(net), static_argnames="train")
    j_logits, j_state = apply(*to_jax((params, state, x)), train=True, key=to_jax(key))
    # float32: ~1e-7 per operation through four layers of <= 72-term sums.
    torch.testing.assert_close(from_jax(j_logits), logits, rtol=1e-4, atol=1e-5)
    assert_trees_close(from_jax(j_state), new_state, rtol=1e-4, atol=1e-5)


@in_own_process
def test_x64_off_is_refused_with_a_clear_error(jax):
    net, params, state, x, _ = setup(0, torch.float32)
    apply = nets.jax_apply(net)
    with x64(jax, enabled=False), pytest.raises(ValueError, match="jax_enable_x64"):
        apply({}, {}, jax.numpy.zeros((1, 3, 8, 8)), train=False)


@in_own_process
def test_torch_tensors_are_refused_with_a_pointer_to_to_jax(jax):
    net, params, state, x, _ = setup(0)
    with pytest.raises(TypeError, match="nets.to_jax"):
        nets.jax_apply(net)(params, state, x, train=False)


# ------------------------------------- the repairs, each failing once torchax no longer needs it


@in_own_process
def test_torchax_still_drops_batch_norm_running_statistics_without_the_repair(jax):
    """If this fails, torchax updates the running statistics itself: remove
    nets.jax_torchax._batch_norm_with_running_update and BATCH_NORM_OPS."""
    from nets.jax_torchax import _environment, _stand_in_for_missing_aten_ops
    from torchax.tensor import Environment, Tensor
    _environment()
    with _stand_in_for_missing_aten_ops():
        plain = Environment()
    state = {"running_mean": torch.zeros(2, dtype=torch.float64),
             "running_var": torch.ones(2, dtype=torch.float64), "num_batches_tracked": torch.tensor(0)}
    x = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, want = layers.batch_norm({}, state, x, train=True, impl="fast")
    for env, changed in ((plain, False), (_environment(), True)):
        wrapped = {k: Tensor(a, env) for k, a in to_jax(state).items()}
        with env:
            _, got = layers.batch_norm({}, wrapped, Tensor(to_jax(x), env), train=True, impl="fast")
        mean = from_jax(got["running_mean"].jax())
        if changed:
            torch.testing.assert_close(mean, want["running_mean"], **TOL)
            torch.testing.assert_close(from_jax(got["running_var"].jax()), want["running_var"], **TOL)
        else:
            assert torch.equal(mean, state["running_mean"])


@in_own_process
def test_compatibility_shim_is_still_needed_and_stands_in_only_for_ops_torch_lacks(jax):
    """If this fails with an empty list, torchax imports cleanly on this torch: remove
    nets.jax_torchax._stand_in_for_missing_aten_ops."""
    from nets.jax_torchax import missing_ops
    missing = missing_ops()
    assert missing, "torchax no longer names missing aten operations: remove the shim"
    for name in missing:
        packet, _, overload = name.removeprefix("aten::").partition(".")
        with pytest.raises(AttributeError):
            op = getattr(torch.ops.aten, packet)
            if overload:
                getattr(op, overload)
    # Outside torchax's modules nothing changed: a missing op still raises.
    with pytest.raises(AttributeError):
        torch.ops.aten.cholesky


# ------------------------------------------------------------------- experiments.jax_train


@in_own_process
def test_jax_train_follows_the_torch_step_in_float64_and_reports_its_numbers(jax, monkeypatch):
    """The command's library on a synthetic 8x8 data set (Model B pools 32 -> 4, and 8 -> 1):
    the optax step in jax.jit equals the torch step (torch.func + optim.sgd) to float64 rounding."""
    from experiments.data.dataset import Dataset
    from experiments.jax import train as jax_train
    g = torch.Generator().manual_seed(0)

    def fake_split(root, split, limit_per_class=None):
        n = 80 if split == "train" else 20
        return Dataset(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                       torch.randint(0, 10, (n,), generator=g), tuple("abcdefghij"))
    monkeypatch.setattr(jax_train, "find_data_dir", lambda data_dir: "synthetic")
    monkeypatch.setattr(jax_train, "load_cifar10", fake_split)
    record = jax_train.run(jax_train.JaxTrainConfig(epochs=1, batch_size=16, check_steps=2,
                                                    dtype="float64", eval_batch_size=16))
    assert record["steps_per_epoch"] == 5 and len(record["check"]) == 2
    for row in record["check"]:
        assert row["params_rel_diff"] < 1e-12 and row["state_rel_diff"] < 1e-12, row
        assert abs(row["loss_jax"] - row["loss_torch"]) < 1e-12, row
    assert 0 <= record["epochs"][0]["test_accuracy"] <= 1
    assert record["compile_s"] > 0 and record["jax_images_per_s"] > 0 and record["torch_images_per_s"] > 0


# ------------------------------------------------- python -m experiments.jax_train: refusals
# (each before jax is imported, so these run in the test session's own process)


def _one_error_line(capsys) -> str:
    """The one ``error:`` line on stderr (beside the data's progress lines), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_jax_train_refuses_a_batch_larger_than_the_data_in_one_line(tiny_cifar, capsys):
    from experiments import jax_train
    assert jax_train.main(["--data-dir", str(tiny_cifar), "--batch-size", "61"]) == 2
    assert "--batch-size: expected at most 60 (the training images), got 61" in _one_error_line(capsys)


def test_jax_train_refuses_a_missing_data_folder_in_one_line(tmp_path, capsys):
    from experiments import jax_train
    assert jax_train.main(["--data-dir", str(tmp_path / "nowhere")]) == 2
    line = _one_error_line(capsys)
    assert "expected CIFAR-10" in line and str(tmp_path / "nowhere") in line


@pytest.mark.parametrize("flag", ["--limit-per-class", "--test-limit-per-class"])
def test_jax_train_refuses_limit_per_class_0_as_every_command_does(flag, tmp_path, capsys):
    from experiments import jax_train
    assert jax_train.main([flag, "0", "--data-dir", str(tmp_path)]) == 2
    assert f"{flag}: expected a whole number >= 1, got 0" in _one_error_line(capsys)
    assert jax_train.build_parser().parse_args([flag, "all"]).__dict__[flag[2:].replace("-", "_")] is None


def test_jax_train_refuses_a_record_of_other_settings_and_leaves_it(tiny_cifar, tmp_path, capsys):
    from experiments import jax_train
    from experiments.common.files import write_json
    from experiments.jax import JaxTrainConfig, check_record_path
    out = tmp_path / "record.json"
    write_json(out, {"config": JaxTrainConfig(epochs=1, data_dir="/elsewhere").to_json(), "epochs": []})
    before = out.read_bytes()
    assert jax_train.main(["--data-dir", str(tiny_cifar), "--epochs", "2", "--lr", "0.5",
                           "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    from experiments.common.settings import Difference
    assert (f"holds a record measured with other settings: {Difference('epochs', 1, 2)}; "
            f"{Difference('lr', None, 0.5)}") in line
    assert out.read_bytes() == before
    # the same settings read elsewhere: a measurement taken again
    check_record_path(out, JaxTrainConfig(epochs=1, data_dir=str(tiny_cifar)))
    out.write_text("{not json")
    assert jax_train.main(["--data-dir", str(tiny_cifar), "--out", str(out)]) == 2
    assert "--out: expected a new file or a jax_train record" in _one_error_line(capsys)
    assert out.read_text() == "{not json"
