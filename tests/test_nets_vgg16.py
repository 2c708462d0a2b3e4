"""VGG16 against torchvision: weights saved to a ``.pth`` and read by ``load_torchvision_weights``
give the same outputs, gradients and batch-norm state; the loader refuses pickled objects and
names wrong keys; truncation returns the documented feature maps; init follows torchvision.

The full VGG16 has 138 M parameters, so these tests run 32x32 inputs (valid thanks to the
adaptive 7x7 pool) at batch 2, in float32, with weights drawn by torchvision (fast) rather than
by ``vgg16().init`` (a hash-based generator: ~1 min for 138 M numbers on a 2-core CPU).
"""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import layers
import nets
import reference_modules as R


@pytest.fixture(scope="module", params=[False, True], ids=["vgg16", "vgg16_bn"])
def torchvision_file(request, tmp_path_factory):
    """A torchvision VGG16 (dropout 0, seeded random weights) and its state dict saved as .pth."""
    batch_norm = request.param
    with torch.random.fork_rng():
        torch.manual_seed(1234 + batch_norm)
        module = R.vgg16_module(batch_norm=batch_norm, dropout=0.0)
        if batch_norm:   # running statistics away from (0, 1), so eval mode really uses them
            for m in module.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tv") / f"vgg16{'_bn' if batch_norm else ''}.pth"
    torch.save(module.state_dict(), path)
    return batch_norm, module, path


def _assert_close(actual, expected, what, *, rtol=1e-4, atol=1e-6):
    """``max |a - e| <= atol + rtol * max |e|``: one pass over 100 M-element gradients, where
    ``torch.testing.assert_close`` needs several (seconds each on this CPU)."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape, what
    error = float((actual - expected).abs().max())
    bound = atol + rtol * float(expected.abs().max())
    assert error <= bound, f"{what}: max abs difference {error:.3g} > {bound:.3g}"


def test_torchvision_weights_loaded_from_pth_train_like_torchvision_outputs_gradients_state(
        torchvision_file):
    batch_norm, module, path = torchvision_file
    net = nets.vgg16(batch_norm=batch_norm, dropout=0.0)
    params, state = nets.load_torchvision_weights(path)
    reference = module.state_dict()
    assert {**params, **state}.keys() == reference.keys()
    assert dict(net.layer.param_shapes) == {k: tuple(v.shape) for k, v in params.items()}
    assert all(torch.equal(v, reference[k]) for k, v in {**params, **state}.items())
    counted = nets.summary(net, (1, 3, 224, 224), show=False)
    assert counted.total_params == sum(p.numel() for p in module.parameters())
    assert counted.total_state == sum(b.numel() for b in module.buffers())

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 1000, (2,), generator=gen)
    if not batch_norm:
        # Gradients of every layer kind of vgg16 (conv with bias, ReLU, pools, linear, dropout)
        # are compared on vgg16_bn; here, where train differs from eval only by dropout (off),
        # the forward pass suffices and saves ~10 s of 138 M-parameter gradients.
        logits, new_state = net.apply(params, state, x, train=True)
        ref_logits, _ = R.reference_call(module, params, state, x, train=True)
        _assert_close(logits, ref_logits, "logits")
        assert new_state == {}
        return

    def loss(p):
        logits, new_state = net.apply(p, state, x, train=True)
        return F.cross_entropy(logits, labels), (logits, new_state)

    grads, (logits, new_state) = torch.func.grad(loss, has_aux=True)(params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref_logits, ref_state = R.reference_call(module, leaves, state, x, train=True)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref_logits, labels), list(leaves.values()))

    # float32, same kernels on both sides; batch-norm reductions may sum in another order, which
    # 16 layers deep leaves differences around 1e-6 relative: 1e-4 of the largest entry.
    _assert_close(logits, ref_logits, "logits")
    assert grads.keys() == params.keys()
    for k, g in zip(leaves, ref_grads):
        _assert_close(grads[k], g, f"gradient of {k}")
    assert new_state.keys() == state.keys()
    for k in state:
        _assert_close(new_state[k].double(), ref_state[k].double(), f"new state {k}")
    assert int(new_state["features.1.num_batches_tracked"]) == 1


def test_eval_mode_equals_torchvision_and_skips_dropout_without_a_key(torchvision_file):
    batch_norm, module, path = torchvision_file
    net = nets.vgg16(batch_norm=batch_norm)                       # dropout 0.5, idle in eval
    params, state = nets.load_torchvision_weights(path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    logits, new_state = net.apply(params, state, x, train=False)
    ref_logits, _ = R.reference_call(module, params, state, x, train=False)
    _assert_close(logits, ref_logits, "logits")
    assert all(new_state[k] is state[k] or torch.equal(new_state[k], state[k]) for k in state)


_SPRUNG = []


def _spring():
    _SPRUNG.append(True)
    return "the payload ran"


class _Trap:
    """Unpickling this calls ``_spring``: what a malicious checkpoint would do."""
    def __reduce__(self):
        return (_spring, ())


def test_loader_refuses_a_pth_carrying_a_pickled_object_without_running_it(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "payload": _Trap()}, path)
    with pytest.raises(ValueError, match=r"load_torchvision_weights: expected .*evil.pth to hold a "
                                         r"plain state dict of tensors; it carries other pickled objects"):
        nets.load_torchvision_weights(path)
    assert not _SPRUNG


def test_loader_refuses_non_tensor_entries_and_non_dict_files(tmp_path):
    torch.save({"features.0.weight": torch.zeros(1), "epoch": 3}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"to map parameter names to tensors .* at \['epoch'\]"):
        nets.load_torchvision_weights(tmp_path / "a.pth")
    torch.save([torch.zeros(1)], tmp_path / "b.pth")
    with pytest.raises(ValueError, match=r"to hold a state dict \(a dict of tensors\), got list"):
        nets.load_torchvision_weights(tmp_path / "b.pth")


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_loader_reports_a_damaged_file_by_name(tmp_path, damage):
    good = tmp_path / "good.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, good)
    path = tmp_path / f"{damage}.pth"
    data = {"empty": b"", "garbage": b"not a torch file at all" * 10,
            "truncated": good.read_bytes()[: good.stat().st_size // 2]}[damage]
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"{damage}\.pth to be a torchvision VGG16 state dict"):
        nets.load_torchvision_weights(path)


def test_loader_reports_a_text_file_starting_with_h_as_the_documented_value_error(tmp_path):
    # An error page saved as .pth: its first byte "h" is pickle's BINGET, whose memo lookup of
    # "t" (116) used to escape torch.load as a bare KeyError.
    path = tmp_path / "page.pth"
    path.write_bytes(b"http/1.1 404 not found\n<html><body>gone</body></html>\n")
    with pytest.raises(ValueError, match=r"load_torchvision_weights: expected .*page\.pth to be a "
                                         r"torchvision VGG16 state dict \(\.pth\), but torch\.load "
                                         r"could not read it: KeyError: 116 \(the file begins with "
                                         r"b'http/1.1 404 not'\)"):
        nets.load_torchvision_weights(path)


def _saved(obj, *, zip_format=True):
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


_SMALL_SD = {"features.0.weight": torch.arange(6.0).reshape(2, 3), "features.0.bias": torch.ones(2)}
_SAVED = {fmt: _saved(_SMALL_SD, zip_format=fmt == "zip") for fmt in ("zip", "legacy")}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")   # torch.load on random bytes
@settings(max_examples=150)
@given(data=st.one_of(st.binary(max_size=48), st.binary(max_size=48).map(lambda b: b"h" + b),
                      st.sampled_from(sorted(_SAVED)).flatmap(
                          lambda fmt: st.integers(0, len(_SAVED[fmt]) - 1).map(
                              lambda cut: _SAVED[fmt][:cut]))))
def test_loader_refuses_any_bytes_that_are_no_whole_torch_file_with_one_value_error(tmp_path_factory, data):
    """Random bytes, bytes after an "h", and torch files (zip and legacy) cut anywhere: always
    the documented ValueError naming the file, never torch.load's KeyError, IndexError, ..."""
    path = tmp_path_factory.mktemp("bytes") / "damaged.pth"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"load_torchvision_weights: expected .*damaged\.pth to "):
        nets.load_torchvision_weights(path)


@pytest.mark.parametrize("obj, kind", [([torch.zeros(2)], "list"), ((torch.zeros(2),), "tuple"),
                                       (torch.zeros(2), "Tensor"), (3, "int"), ("vgg16", "str"),
                                       (None, "NoneType")])
def test_loader_refuses_a_pickle_that_is_not_a_dict_naming_what_it_holds(tmp_path, obj, kind):
    path = tmp_path / "not_a_dict.pth"
    path.write_bytes(_saved(obj))
    with pytest.raises(ValueError, match=rf"expected .*not_a_dict\.pth to hold a state dict \(a dict "
                                         rf"of tensors\), got {kind}$"):
        nets.load_torchvision_weights(path)


def test_loader_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    shapes = nets.vgg16().layer.param_shapes
    sd = {k: torch.zeros(s) for k, s in shapes.items() if k not in ("classifier.0.weight",
                                                                      "classifier.3.weight")}
    del sd["features.0.bias"]
    sd["classifier.7.weight"] = torch.zeros(3)
    sd["classifier.0.weight"] = torch.zeros(4096, 7)           # small: no 400 MB file to write
    sd["classifier.3.weight"] = torch.zeros(4096, 10)
    torch.save(sd, tmp_path / "wrong.pth")
    with pytest.raises(ValueError) as err:
        nets.load_torchvision_weights(tmp_path / "wrong.pth")
    message = str(err.value)
    assert "is not a torchvision vgg16 state dict" in message
    assert "missing keys ['features.0.bias']" in message
    assert "unexpected keys ['classifier.7.weight']" in message
    assert ("mis-shaped keys ['classifier.0.weight: expected (4096, 25088), got (4096, 7)', "
            "'classifier.3.weight: expected (4096, 4096), got (4096, 10)']") in message


def test_loader_detects_the_variant_and_refuses_the_other_one(torchvision_file):
    batch_norm, _, path = torchvision_file
    params, state = nets.load_torchvision_weights(path, batch_norm=batch_norm)
    assert bool(state) == batch_norm
    with pytest.raises(ValueError, match=r"load_torchvision_weights: expected a vgg16(_bn)? checkpoint "
                                         rf"\(batch_norm={not batch_norm}\), got a vgg16"):
        nets.load_torchvision_weights(path, batch_norm=not batch_norm)


def test_loader_with_another_num_classes_drops_the_head_for_a_fresh_one(torchvision_file):
    batch_norm, module, path = torchvision_file
    same, _ = nets.load_torchvision_weights(path, num_classes=1000)
    assert "classifier.6.weight" in same
    params, state = nets.load_torchvision_weights(path, num_classes=256)
    net = nets.vgg16(num_classes=256, batch_norm=batch_norm)
    missing = set(net.layer.param_shapes) - set(params)
    assert missing == {"classifier.6.weight", "classifier.6.bias"}
    head, _ = dict(nets.leaves(net.layer))["classifier.6"].init(layers.random.key(0))
    params = {**params, **{f"classifier.6.{k}": v for k, v in head.items()}}
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits, _ = net.apply(params, state, x, train=False)
    assert logits.shape == (1, 256)
    # Everything before the head is the pretrained net: its 4096 features feed the new layer.
    module.eval()
    features = torch.flatten(module.avgpool(module.features(x)), 1)
    hidden = module.classifier[:6](features)
    _assert_close(logits, F.linear(hidden, head["weight"], head["bias"]), "new head's logits")


def test_truncated_vgg16_returns_block_3s_pooled_feature_map_at_224(torchvision_file):
    batch_norm, module, path = torchvision_file
    if batch_norm:
        pytest.skip("one variant suffices at 224x224; the summary tests cover every block's shape")
    net = nets.vgg16(truncate_after_block=3)
    params, state = nets.load_torchvision_weights(path, truncate_after_block=3)
    assert params.keys() == net.layer.param_shapes.keys()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    y, _ = net.apply(params, state, x, train=False)
    assert tuple(y.shape) == (1, 256, 28, 28)                     # the report's 28x28x256
    assert nets.summary(net, (1, 3, 224, 224), show=False).output_shape == (1, 256, 28, 28)
    twin = R.vgg16_module(truncate_after_block=3)
    ref, _ = R.reference_call(twin, params, state, x, train=False)
    _assert_close(y, ref, "block 3 features")


def test_truncation_after_each_block_halves_the_side_and_follows_the_widths():
    # At 224: block 3 is the report's 28x28x256, block 4 its 14x14x512.
    widths = (64, 128, 256, 512, 512)
    for k in range(1, 6):
        out = nets.summary(nets.vgg16(truncate_after_block=k), (1, 3, 224, 224), show=False)
        assert out.output_shape == (1, widths[k - 1], 224 >> k, 224 >> k)
        assert out.rows[-1].kind.startswith("MaxPool2d")


def test_vgg16_init_follows_torchvision_kaiming_fan_out_convs_and_normal_linear():
    params, state = nets.vgg16(batch_norm=True, truncate_after_block=2).init(layers.random.key(3))
    convs = [k for k, v in params.items() if v.dim() == 4]
    assert len(convs) == 4
    for k in convs:
        w = params[k]
        std = math.sqrt(2.0 / (w.shape[0] * w.shape[2] * w.shape[3]))       # gain^2 / fan_out
        # Kolmogorov-Smirnov at a fixed key: deterministic, and a wrong fan would fail it hard.
        assert stats.kstest(w.flatten().numpy(), "norm", args=(0.0, std)).pvalue > 1e-3, k
        assert torch.equal(params[k[:-len("weight")] + "bias"], torch.zeros(w.shape[0]))
    for k, v in params.items():
        if v.dim() == 1 and not k[:-len("bias")] + "weight" in convs:       # batch norm
            assert torch.equal(v, torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v))
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if "mean" in k)
    head = dict(nets.leaves(nets.vgg16(num_classes=100).layer))["classifier.6"]
    p, _ = head.init(layers.random.key(4))
    assert stats.kstest(p["weight"].flatten().numpy(), "norm", args=(0.0, 0.01)).pvalue > 1e-3
    assert torch.equal(p["bias"], torch.zeros(100))


@pytest.mark.parametrize("bad, match", [
    (dict(num_classes=0), "vgg16: expected num_classes to be a positive int, got 0"),
    (dict(truncate_after_block=6), "vgg16: expected truncate_after_block to be None or an int in 1..5, got 6"),
    (dict(dropout=1.0), r"vgg16: expected dropout \(a drop probability\) in \[0, 1\), got 1.0"),
])
def test_vgg16_rejects_bad_arguments_naming_what_it_expected(bad, match):
    with pytest.raises(ValueError, match=match):
        nets.vgg16(**bad)
