"""cross_entropy: both formulations equal F.cross_entropy over every option (values, gradients)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from torch.func import grad

import layers
from layers.testing import cross_entropy_cases, custom_backward_nodes, dtypes, seeds

# float64: log_softmax over <= 5 classes plus a sum over <= 3*3*3 = 27 elements; ~1e-15 relative.
# float32: eps 6e-8 times logits of magnitude ~5 and a 27-term sum -> ~1e-5; allow 1e-4.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def make(case, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape, classes = case["shape"], case["classes"]
    logits = torch.randn(shape, generator=g, dtype=dtype) * 3
    class_dim = 0 if len(shape) == 1 else 1
    if case["probabilities"]:
        target = torch.softmax(torch.randn(shape, generator=g, dtype=dtype), dim=class_dim)
    else:
        target = torch.randint(0, classes, shape[:class_dim] + shape[class_dim + 1:], generator=g)
        if case["ignore_index"] == -100:          # sprinkle ignored elements
            target = torch.where(torch.rand(target.shape, generator=g) < 0.3, -100, target)
    weight = torch.rand(classes, generator=g, dtype=dtype) + 0.1 if case["weight"] else None
    return logits, target, weight


@settings(deadline=None, max_examples=80)
@given(cross_entropy_cases(), dtypes(), seeds())
def test_cross_entropy_value_and_gradients_equal_torch(case, dtype, seed):
    logits, target, weight = make(case, dtype, seed)
    if not case["probabilities"] and case["reduction"] == "mean":
        assume(bool((target != case["ignore_index"]).any()))     # all ignored: 0/0, tested below
    opts = dict(weight=weight, ignore_index=case["ignore_index"], reduction=case["reduction"],
                label_smoothing=case["label_smoothing"])
    ref_logits = logits.clone().requires_grad_(True)
    ref_target = target.clone().requires_grad_(True) if case["probabilities"] else target
    ref = F.cross_entropy(ref_logits, ref_target, **opts)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    (ref * cot).sum().backward()

    def f(logits, target):
        return layers.cross_entropy(logits, target, impl=case["impl"], **opts)

    out = f(logits, target)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref.detach(), **TOL[dtype])
    loss = lambda lg, t: (f(lg, t) * cot).sum()   # noqa: E731
    if case["probabilities"]:
        g_logits, g_target = grad(loss, argnums=(0, 1))(logits, target)
        torch.testing.assert_close(g_target, ref_target.grad, **TOL[dtype])
    else:
        g_logits = grad(loss)(logits, target)
    torch.testing.assert_close(g_logits, ref_logits.grad, **TOL[dtype])


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_cross_entropy_mean_over_all_ignored_targets_is_nan_as_torch(impl):
    logits = torch.randn(3, 4, dtype=torch.float64)
    target = torch.full((3,), -100)
    assert torch.isnan(layers.cross_entropy(logits, target, impl=impl))
    assert torch.isnan(F.cross_entropy(logits, target))


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_cross_entropy_label_smoothing_formula_by_hand(impl):
    logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    eps, k = 0.2, 3
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    expect = -((1 - eps) * logp[0, 0] + eps / k * logp[0].sum())
    got = layers.cross_entropy(logits, torch.tensor([0]), label_smoothing=eps, impl=impl)
    torch.testing.assert_close(got, expect, rtol=1e-14, atol=0)


def test_cross_entropy_rejects_target_batch_size_mismatch():
    with pytest.raises(ValueError, match=r"cross_entropy: expected class-index target of shape \(4,\) "
                                         r"\(logits are \(4, 10\)\), got \(5,\)"):
        layers.cross_entropy(torch.zeros(4, 10), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"cross_entropy: expected class-probability target shaped "
                                         r"like logits \(4, 10\), got \(4, 1\)"):
        layers.cross_entropy(torch.zeros(4, 10), torch.zeros(4, 1))


def test_cross_entropy_rejects_ignore_index_with_probability_targets():
    with pytest.raises(ValueError, match=r"cross_entropy: expected the default ignore_index=-100 with "
                                         r"class-probability targets, got ignore_index=3"):
        layers.cross_entropy(torch.zeros(4, 10), torch.zeros(4, 10), ignore_index=3)


def test_cross_entropy_rejects_bad_weight_reduction_smoothing_and_dtypes():
    lg, t = torch.zeros(4, 10), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^cross_entropy: expected weight of shape \(10,\) \(one per class of "
                                         r"logits \(4, 10\)\), got \(9,\)$"):
        layers.cross_entropy(lg, t, weight=torch.ones(9))
    with pytest.raises(ValueError, match=r"cross_entropy: expected reduction in .*got 'avg'"):
        layers.cross_entropy(lg, t, reduction="avg")
    with pytest.raises(ValueError, match=r"cross_entropy: expected label_smoothing in \[0, 1\], got 1.5"):
        layers.cross_entropy(lg, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match=r"cross_entropy: expected target of class indices .*got torch.bool"):
        layers.cross_entropy(lg, t.bool())
    with pytest.raises(TypeError, match=r"cross_entropy: expected logits with a floating dtype, got torch.int64"):
        layers.cross_entropy(t.reshape(4, 1).expand(4, 10), t)
    with pytest.raises(ValueError, match=r"cross_entropy: expected logits .*got \(\)"):
        layers.cross_entropy(torch.zeros(()), t)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_explicit_cross_entropy_builds_its_tensors_on_the_inputs_device(reduction, weighted):
    # Tensors made inside must follow the inputs: the ignored targets' stand-in index (forward),
    # the class ids (backward) and the unit class weights that stand in for weight=None. Two probes, as a CUDA input would: CPU inputs under
    # torch.device("meta") (where a tensor made without a device lands; it does not reach the
    # backward) give the same value and gradients as outside, and meta inputs (shapes and devices,
    # no values) keep the meta device through the backward.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    weight = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    target = torch.tensor([[0, 2], [-100, 1], [1, -100], [2, 0]])

    def run(logits, weight, target):
        z, w = logits.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = layers.cross_entropy(z, target, weight=w if weighted else None, reduction=reduction,
                                    label_smoothing=0.1, impl="explicit")
        return (loss.detach(),) + torch.autograd.grad(loss.sum(), (z, w) if weighted else (z,))

    want = run(logits, weight, target)
    with torch.device("meta"):
        got = run(logits, weight, target)
    for g_, w_ in zip(got, want):
        assert g_.device == logits.device and torch.equal(g_, w_)
    on_meta = run(logits.to("meta"), weight.to("meta"), target.to("meta"))
    assert all(m.device.type == "meta" and m.shape == w_.shape for m, w_ in zip(on_meta, want))


def test_cross_entropy_refuses_a_non_tensor_target_and_a_non_int_ignore_index_naming_itself():
    logits = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"^cross_entropy: expected target to be a torch\.Tensor, got list$"):
        layers.cross_entropy(logits, [0, 1])
    with pytest.raises(TypeError, match=r"^cross_entropy: expected ignore_index to be an int, got 1\.5$"):
        layers.cross_entropy(logits, torch.tensor([0, 1]), ignore_index=1.5)


def test_cross_entropy_runs_the_formulation_asked_for_and_refuses_others():
    # Both formulations give torch's values, so only the autograd graph tells them apart: "fast"
    # is F.cross_entropy (torch's own backward nodes), "explicit" runs ExplicitCrossEntropy's.
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 1])
    nodes = {"fast": set(), "explicit": {"ExplicitCrossEntropyBackward"}}
    for impl in ("fast", "explicit"):
        assert custom_backward_nodes(layers.cross_entropy(logits, target, impl=impl)) == nodes[impl]
        with layers.default_impl(impl):                      # impl=None follows the default
            assert custom_backward_nodes(layers.cross_entropy(logits, target)) == nodes[impl]
    with pytest.raises(ValueError, match=r"^cross_entropy: expected impl to be one of \('fast', 'explicit'\), "
                                         r"got 'slow'$"):
        layers.cross_entropy(logits, target, impl="slow")


@pytest.mark.parametrize("impl", ["fast", "explicit"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_of_masked_minus_inf_logits_is_finite_as_torch(impl, reduction):
    # A logit of -inf (a masked class) has probability 0; without label smoothing only the target
    # class's log-probability enters, so the loss and its gradient stay finite, as in torch.
    # (With smoothing every log-probability enters and torch's loss is inf: not checked here.)
    inf = float("inf")
    logits = torch.tensor([[2.0, -inf, 0.5], [0.0, 1.0, -inf], [-inf, -inf, 3.0]], dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    weight = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    ref_logits = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits, target, weight=weight, reduction=reduction)
    ref.sum().backward()
    out = layers.cross_entropy(logits, target, weight=weight, reduction=reduction, impl=impl)
    g = grad(lambda z: layers.cross_entropy(z, target, weight=weight, reduction=reduction, impl=impl).sum())(logits)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    # float64 log_softmax over 3 classes: ~1e-16 relative
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, ref_logits.grad, rtol=1e-12, atol=1e-12)

