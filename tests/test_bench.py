"""The speed benchmark's parts on tiny configurations: the baseline computes what the pure step
computes, the timing helpers interleave fairly, and the report says what was measured."""
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layers
import nets
import optim
from experiments import bench as bench_cli
from experiments import train as trainer
from experiments.benchmarks import steps as bench
from experiments.benchmarks.layers import bench_layers, layer_cases
from experiments.benchmarks.pipeline import bench_pipeline, ours_epoch, random_images, torchvision_loader
from experiments.benchmarks.reference import ReferenceLoop, reference_module
from experiments.benchmarks.timing import interleaved, matmul_peak, median
from layers import random as jr

SEEDS = st.integers(0, 2**31 - 1)
NETS = {"a": nets.model_a, "b": nets.model_b, "c": nets.model_c}


# --------------------------------------------------------------------------------------------
# The baseline is the same computation as the pure step


@pytest.mark.parametrize("model", ["a", "b", "c"])
def test_reference_module_state_dict_keys_and_shapes_equal_the_pure_nets(model):
    params, state = NETS[model]().init(jr.key(0))
    ref = reference_module(model).state_dict()
    assert set(ref) == set(params) | set(state)
    for k, v in {**params, **state}.items():
        assert ref[k].shape == v.shape, k


@settings(deadline=None, max_examples=2)
@given(seed=SEEDS, model=st.sampled_from(["a", "b", "c"]))
def test_reference_module_eval_output_equals_pure_apply(seed, model):
    net = NETS[model]()
    params, state = net.init(jr.key(seed), dtype=torch.float64)
    module = reference_module(model).double()
    module.load_state_dict({**params, **state})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours, _ = net.apply(params, state, x, train=False)
    with torch.no_grad():
        theirs = module.eval()(x)
    # float64 through <= 9 convs of <= 2304-term sums: rounding-order differences only
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@settings(deadline=None, max_examples=2)
@given(seed=SEEDS)
def test_reference_loop_and_pure_step_follow_the_same_trajectory(seed):
    net = nets.model_b(dropout=0.0, head_dropout=0.0)  # dropout draws differ between the two
    params, state = net.init(jr.key(seed), dtype=torch.float64)
    module = reference_module("b", dropout=0.0, head_dropout=0.0).double()
    loop = ReferenceLoop(module, {**params, **state}, lr=bench.LR, momentum=bench.MOMENTUM,
                         weight_decay=bench.WEIGHT_DECAY, label_smoothing=bench.LABEL_SMOOTHING)
    opt = optim.sgd(bench.LR, momentum=bench.MOMENTUM, nesterov=True, weight_decay=bench.WEIGHT_DECAY)
    loss_fn = lambda logits, y: layers.cross_entropy(logits, y, label_smoothing=bench.LABEL_SMOOTHING)  # noqa: E731
    step = trainer.make_step(net, opt, loss_fn)
    opt_state = opt.init(params)
    g = torch.Generator().manual_seed(seed)
    for i in range(2):  # Model B pools globally, so 16x16 inputs keep the test quick
        x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (4,), generator=g)
        ref_loss = loop.step(x, y)
        params, state, opt_state, metrics = step(params, state, opt_state, (x, y), jr.key(i))
        # float64, 2 SGD steps through a 6-conv net: rounding-order differences only
        torch.testing.assert_close(metrics["loss"], ref_loss, rtol=1e-9, atol=1e-12)
    ref = module.state_dict()
    for k, v in {**params, **state}.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-9, atol=1e-12, msg=k)


def test_the_peer_with_channels_last_and_bf16_computes_what_the_pure_step_does():
    net = nets.model_b(dropout=0.0, head_dropout=0.0)
    params, state = net.init(jr.key(0))
    loop = ReferenceLoop(reference_module("b", dropout=0.0, head_dropout=0.0), {**params, **state},
                         lr=bench.LR, momentum=bench.MOMENTUM, weight_decay=bench.WEIGHT_DECAY,
                         label_smoothing=bench.LABEL_SMOOTHING, channels_last=True, bf16=True)
    assert loop.module.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    opt = optim.sgd(bench.LR, momentum=bench.MOMENTUM, nesterov=True, weight_decay=bench.WEIGHT_DECAY)
    loss_fn = lambda logits, y: layers.cross_entropy(logits, y, label_smoothing=bench.LABEL_SMOOTHING)  # noqa: E731
    step = trainer.make_step(net, opt, loss_fn, bf16=True, channels_last=True)
    opt_state = opt.init(params)
    params, opt_state = trainer.to_channels_last(params), trainer.to_channels_last(opt_state)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        ref_loss = loop.step(x, y)
        params, state, opt_state, metrics = step(params, state, opt_state, (x, y), jr.key(i))
        # both run the convolutions in bfloat16 (8 significant bits): the losses (about 2.3)
        # agree to bf16 rounding of the logits, well inside 2e-2
        torch.testing.assert_close(metrics["loss"], ref_loss, rtol=2e-2, atol=2e-2)
        assert ref_loss.dtype == torch.float32


def test_step_flops_are_six_times_the_forward_multiply_adds_and_scale_with_the_batch():
    net = nets.model_a()
    macs = nets.summary(net, (1, 3, 32, 32), show=False).total_macs
    assert bench.step_flops(net, 1) == 6 * macs
    assert bench.step_flops(net, 128) == 128 * bench.step_flops(net, 1)


@pytest.mark.parametrize("config", [c for c in bench.CONFIGS if not c.compile], ids=lambda c: c.label)
def test_every_runner_advances_its_own_trajectory_with_finite_losses(config):
    run = bench.make_runner(config, "a", batch=2, device="cpu")
    first, second = float(run()), float(run())
    assert torch.isfinite(torch.tensor([first, second])).all()
    assert first != second  # same batch, new parameters: the trajectory moved


def test_make_runner_rejects_an_unknown_model():
    with pytest.raises(ValueError, match="make_runner: expected model in"):
        bench.make_runner(bench.CONFIGS[0], "z", batch=2, device="cpu")


# --------------------------------------------------------------------------------------------
# Timing helpers


def test_interleaved_runs_every_function_once_per_round_in_rotating_order():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = interleaved(fns, 3, "cpu")
    assert calls == list("abc" "bca" "cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_interleaved_and_median_reject_empty_work():
    with pytest.raises(ValueError, match="interleaved: expected rounds a positive int, got 0"):
        interleaved({"a": lambda: None}, 0, "cpu")
    with pytest.raises(ValueError, match="median: expected at least one value"):
        median([])


def test_matmul_peak_is_a_positive_flop_rate():
    assert matmul_peak(torch.float32, "cpu", n=64, reps=2) > 0
    with pytest.raises(ValueError, match="matmul: expected a positive int n"):
        matmul_peak(torch.float32, "cpu", n=0)


# --------------------------------------------------------------------------------------------
# Layers and pipeline


def test_layer_cases_fast_and_explicit_agree_and_bench_reports_both():
    for case in layer_cases(2):
        inputs = [torch.randn(s, generator=torch.Generator().manual_seed(0)) for s in case.input_shapes]
        # float32, same math: only summation order differs (conv sums 1152 terms)
        torch.testing.assert_close(case.call(inputs, "explicit"), case.call(inputs, "fast"),
                                   rtol=1e-4, atol=1e-4, msg=case.name)
    rows = bench_layers(2, 1, "cpu", cases=layer_cases(2)[2:5])
    assert [r["name"] for r in rows] == [c.name for c in layer_cases(2)[2:5]]
    for r in rows:
        assert r["explicit_ms"] > 0 and r["fast_ms"] > 0
        assert r["ratio"] == pytest.approx(r["explicit_ms"] / r["fast_ms"])


def test_both_pipelines_yield_normalised_32x32_batches():
    images, labels = random_images(64)
    assert ours_epoch(images, labels, 32, jr.key(0)) == 64
    x, y = next(iter(torchvision_loader(images, labels, 32, workers=0)))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (32,)
    # (v / 255 - mean) / std lies in [-mean / std, (1 - mean) / std] within [-2.1, 2.2]
    assert x.min() >= -2.1 and x.max() <= 2.2
    rates = bench_pipeline(64, 32, 1, "cpu", workers=(0,))
    assert set(rates) == {"ours (whole-batch tensors)", "torchvision DataLoader, num_workers=0"}
    assert all(v > 0 for v in rates.values())
    with pytest.raises(ValueError, match="bench_pipeline: expected at least one batch of 32"):
        bench_pipeline(16, 32, 1, "cpu")


# --------------------------------------------------------------------------------------------
# The report


def _row(label, img_s, dtype="fp32", frac=0.5):
    return {"label": label, "reference": label.startswith("(1"), "dtype": dtype, "img_s": img_s,
            "tflops": 0.1, "peak_fraction": frac, "compile_s": None}


@pytest.mark.parametrize("peer_img_s, beats_peer", [(159.0, True), (160.0, True), (161.0, False)])
def test_targets_are_judged_from_the_rows(peer_img_s, beats_peer):
    rows = [_row("(1)", 100.0), _row("(1b)", peer_img_s, "bf16"), _row("(2)", 98.0),
            _row("(6)", 160.0, "bf16", 0.7)]
    for r in rows:
        r["ratio"] = r["img_s"] / 100.0
    assert bench.best_peer(rows)["label"] == "(1b)" and bench.best_config(rows)["label"] == "(6)"
    got = {what: ok for what, _, ok in bench.targets({"b": rows}, {"ours (whole-batch tensors)": 3000.0})}
    assert got == {"Model B: (2)/(1) >= 0.97": True, "Model B: best configuration >= 1.5x (1)": True,
                   "Model B: best configuration >= 1.00x the best torch.nn peer": beats_peer,
                   "Model B: best configuration >= 60% of its dtype's peak": True,
                   "data pipeline >= 20x the fastest training step": False}


def test_quick_main_writes_the_table_machine_and_command(tmp_path, capsys):
    out = tmp_path / "perf.md"
    argv = ["--quick", "--batch", "2", "--reps", "1", "--skip", "layers,pipeline,ensembles", "--write",
            "--out", str(out)]
    assert bench_cli.main(argv) == 0
    text = out.read_text()
    assert "python -m experiments.bench --quick --batch 2 --reps 1" in text and "--write" in text
    assert "torch " + torch.__version__ in text and "cores" in text
    for config in bench.CONFIGS:
        assert (config.label in text) == (not config.compile)  # --quick leaves compile out
    assert "| Model A: (2)/(1) >= 0.97 |" in text
    assert text.strip() in capsys.readouterr().out


def test_main_only_prints_the_report_unless_asked_to_write_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                  # docs/performance.md here is not the committed one
    argv = ["--quick", "--reps", "1", "--skip", "steps,layers,pipeline,ensembles"]
    assert bench_cli.main(argv) == 0
    assert "# Performance" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    # --write (re)writes docs/performance.md and keeps its hand-written notes
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "performance.md").write_text(f"OLD REPORT\n{bench.NOTES_MARKER}\nnotes\n")
    assert bench_cli.main([*argv, "--write"]) == 0
    text = (tmp_path / "docs" / "performance.md").read_text()
    assert text.startswith("# Performance") and text.endswith(f"{bench.NOTES_MARKER}\nnotes\n")
    assert "OLD REPORT" not in text
    # --out alone would write nothing: refused before anything runs
    with pytest.raises(SystemExit) as e:
        bench_cli.main([*argv, "--out", str(tmp_path / "x.md")])
    assert e.value.code == 2 and "expected --write too" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def test_the_tutorial_module_has_the_pure_nets_keys_and_computes_its_logits():
    from experiments.benchmarks.ensembles import peer_module

    net = nets.tutorial_net()
    params, state = net.init(jr.key(3))
    module = peer_module("tutorial", {**params, **state})
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in params.items()}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(module(x), net.apply(params, state, x, train=False)[0])


@pytest.mark.parametrize("model,batch", [("tutorial", 4), ("a", 2)])
def test_every_eager_ensemble_variant_trains_the_same_members(model, batch):
    """purenn, the torch.nn loop and torch.func start from the same members and take the same SGD
    step: their first two losses agree (the second one sees the first update)."""
    from experiments.benchmarks.ensembles import make_variant

    k = 2
    losses = {}
    for variant in ("purenn", "torch.nn loop", "torch.func"):
        run = make_variant(variant, model, k, batch)
        losses[variant] = [run().reshape(-1)[-1] for _ in range(2)]   # the last member's
    for variant in ("torch.nn loop", "torch.func"):
        for ours, theirs in zip(losses["purenn"], losses[variant]):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.equal(losses["purenn"][0], losses["purenn"][1])


def test_make_variant_refuses_unknown_variants_and_models():
    from experiments.benchmarks.ensembles import make_variant

    with pytest.raises(ValueError, match="expected a variant"):
        make_variant("jax", "tutorial", 2, 4)
    with pytest.raises(ValueError, match="expected a model"):
        make_variant("purenn", "b", 2, 4)


def test_ensemble_bench_reports_every_variant_the_fastest_peer_and_the_limit():
    from experiments.benchmarks.ensembles import bench_ensembles, render_ensembles

    variants = ("purenn", "torch.nn loop", "torch.func")
    rows = bench_ensembles(models=("tutorial",), ks=(1, 2), batch=4, rounds=1, steps=1,
                           variants=variants, matmul_n=64, stream=io.StringIO())
    assert [(r["model"], r["k"]) for r in rows] == [("tutorial", 1), ("tutorial", 2)]
    for r in rows:
        assert set(r["img_s"]) == set(variants) and min(r["img_s"].values()) > 0
        peers = {v: r["img_s"][v] for v in variants[1:]}
        assert r["fastest_peer"] == max(peers, key=peers.get)
        assert abs(r["ratio"] - r["img_s"]["purenn"] / peers[r["fastest_peer"]]) < 1e-9
        assert r["limit_img_s"] > 0 and r["matmul_tflops"] > 0 and r["peak_mib"] > 0
    table = "\n".join(render_ensembles(rows, 4, 1))
    assert "| tutorial | 2 |" in table and "torch.func" in table and "% of limit" in table


@pytest.mark.parametrize("flag,value", [("--members", "0"), ("--members", "x"),
                                        ("--ensemble-models", "b")])
def test_the_ensemble_flags_refuse_what_they_cannot_run(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        bench_cli.build_parser().parse_args([flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_the_torch_nn_sweep_peer_trains_a_tutorial_net_and_reports_its_time_and_accuracy():
    from experiments.benchmarks.torch_sweep import train_one

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(40) % 10
    run = train_one(images, labels, images[:20], labels[:20], lr=0.01, seed=1, epochs=2, batch=8)
    assert run["lr"] == 0.01 and run["seed"] == 1 and run["seconds"] > 0
    assert 0.0 <= run["test_accuracy"] <= 100.0
    assert train_one(images, labels, images[:20], labels[:20], lr=0.01, seed=1, epochs=2,
                     batch=8)["test_accuracy"] == run["test_accuracy"]   # seeded: repeatable
