"""``nets.summary`` predicts, by shape rules alone, what ``apply`` does.

For every net the shape predicted for each layer equals the shape that layer produces when the
leaves are run one by one (and running them one by one equals ``apply``); parameter counts equal
those of ``init``; multiply-adds of convolutions and linear layers equal torch's FLOP counter / 2.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import layers
import nets


def _zeros_like_declared(net, dtype=torch.float32):
    """Parameters and state of the declared shapes without drawing them (for the 138 M VGG16)."""
    params = {k: torch.zeros(s, dtype=dtype) for k, s in net.layer.param_shapes.items()}
    state = {k: (torch.zeros(s, dtype=torch.int64) if k.endswith("num_batches_tracked")
                 else torch.ones(s, dtype=dtype)) for k, s in net.layer.state_shapes.items()}
    return params, state


def _run_leaves(net, params, state, x, *, train):
    """Each leaf's output shape, running the leaves in order with their slices of the dicts."""
    shapes = []
    for path, leaf in nets.leaves(net.layer):
        p = {k: params[f"{path}.{k}"] for k in leaf.param_shapes}
        s = {k: state[f"{path}.{k}"] for k in leaf.state_shapes}
        x, _ = leaf.apply(p, s, x, train=train, key=None)
        shapes.append(tuple(x.shape))
    return shapes, x


def _check_agreement(net, params, state, x, *, train):
    predicted = nets.summary(net, tuple(x.shape), show=False)
    actual, out = _run_leaves(net, params, state, x, train=train)
    assert [r.output_shape for r in predicted.rows] == actual
    assert [r.name for r in predicted.rows] == [p for p, _ in nets.leaves(net.layer)]
    y, _ = net.apply(params, state, x, train=train)
    assert predicted.output_shape == tuple(y.shape)
    return out, y


@settings(deadline=None, max_examples=4)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(2, 3), side=st.sampled_from([8, 16, 24, 32]),
       which=st.sampled_from(["model_a", "model_b", "model_c"]), train=st.booleans())
def test_predicted_shapes_equal_every_layers_actual_output_for_models_a_b_c(seed, batch, side,
                                                                             which, train):
    net = {"model_a": lambda: nets.model_a(image_size=side),
           "model_b": lambda: nets.model_b(dropout=0.0, head_dropout=0.0),
           "model_c": lambda: nets.model_c(dropout=0.0, head_dropout=0.0)}[which]()
    params, state = net.init(layers.random.key(seed), dtype=torch.float64)
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    out, y = _check_agreement(net, params, state, x, train=train)
    assert torch.equal(out, y)          # the leaves in order are the net


@pytest.mark.parametrize("kwargs", [dict(), dict(batch_norm=True), dict(truncate_after_block=2),
                                    dict(num_classes=10, batch_norm=True, truncate_after_block=5)],
                         ids=["vgg16", "vgg16_bn", "vgg16[:2]", "vgg16_bn[:5]"])
def test_predicted_shapes_equal_every_layers_actual_output_for_vgg16(kwargs):
    net = nets.vgg16(**kwargs)
    params, state = _zeros_like_declared(net)
    _check_agreement(net, params, state, torch.zeros(1, 3, 32, 32), train=False)


@pytest.mark.parametrize("make", [nets.model_a, nets.model_b, nets.model_c])
def test_parameter_and_state_counts_equal_what_init_makes(make):
    net = make()
    params, state = net.init(layers.random.key(0))
    out = nets.summary(net, (1, 3, 32, 32), show=False)
    assert out.total_params == sum(v.numel() for v in params.values())
    assert out.total_state == sum(v.numel() for v in state.values())
    by_layer = {r.name: r.params for r in out.rows}
    for path, count in by_layer.items():
        assert count == sum(v.numel() for k, v in params.items() if k.startswith(path + "."))


@pytest.mark.parametrize("make", [nets.model_a, nets.model_c])
def test_conv_and_linear_multiply_adds_equal_half_of_torchs_flop_count(make):
    net = make()
    params, state = net.init(layers.random.key(0))
    x = torch.zeros(2, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter:
        net.apply(params, state, x, train=False)
    rows = nets.summary(net, tuple(x.shape), show=False).rows
    ours = sum(r.macs for r in rows if r.kind.startswith(("Conv2d", "Linear")))
    assert 2 * ours == counter.get_total_flops()


def test_summary_prints_a_table_of_every_layer_with_totals(capsys):
    out = nets.summary(nets.model_b(), (1, 3, 32, 32))
    printed = capsys.readouterr().out
    assert printed.strip() == out.table == str(out)
    lines = printed.splitlines()
    assert lines[0] == "model_b: input (1, 3, 32, 32)"
    assert lines[1].split() == ["layer", "kind", "output", "shape", "params", "mult-adds"]
    for row in out.rows:
        assert any(line.startswith(row.name + " ") and f"{row.params:,}" in line for line in lines)
    total = next(line for line in lines if line.startswith("total"))
    assert f"{out.total_params:,}" in total and f"{out.total_macs:,}" in total
    assert out.total_macs == sum(r.macs for r in out.rows)
    assert math.isclose(out.total_macs, 153e6, rel_tol=0.01)     # the documented ~153 M


def test_summary_names_the_layer_that_cannot_take_the_shape():
    with pytest.raises(ValueError, match=r"summary\(model_a\): layer features.0 \(Conv2d\(3, 64, .*\) "
                                         r"cannot take input \(1, 4, 32, 32\): Conv2d\(3, 64\): "
                                         r"expected input with 3 channels"):
        nets.summary(nets.model_a(), (1, 4, 32, 32), show=False)
    with pytest.raises(ValueError, match=r"layer classifier.1 \(Linear\(8192, 256\)\) cannot take input "
                                         r"\(1, 6272\): Linear\(8192, 256\): expected input with last "
                                         r"dimension 8192"):
        nets.summary(nets.model_a(), (1, 3, 28, 28), show=False)
    with pytest.raises(TypeError, match="summary: expected a nets Net or Layer, got Sequential"):
        nets.summary(torch.nn.Sequential(), (1, 3, 32, 32))
