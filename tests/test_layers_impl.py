"""The formulation switch: per call, global, and scoped; fast is the default."""
import re

import pytest
import torch

import layers
from layers import _impl


@pytest.fixture(autouse=True)
def restore_default():
    before = layers.get_default_impl()
    yield
    layers.set_default_impl(before)


def test_fast_is_the_default_formulation():
    assert layers.get_default_impl() == "fast"


def _spy(monkeypatch):
    """Record which formulation conv2d runs, by watching the fused primitive."""
    calls = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(layers.conv.F, "conv2d", lambda *a, **k: calls.append("fast") or real(*a, **k))
    return calls


def test_set_default_impl_switches_calls_without_impl(monkeypatch):
    calls = _spy(monkeypatch)
    p, x = {"weight": torch.ones(1, 1, 2, 2)}, torch.ones(1, 1, 3, 3)
    layers.conv2d(p, x)
    layers.set_default_impl("explicit")
    assert layers.get_default_impl() == "explicit"
    layers.conv2d(p, x)
    layers.conv2d(p, x, impl="fast")          # the per-call keyword wins over the default
    assert calls == ["fast", "fast"]


def test_default_impl_context_manager_scopes_and_restores_even_on_error(monkeypatch):
    calls = _spy(monkeypatch)
    p, x = {"weight": torch.ones(1, 1, 2, 2)}, torch.ones(1, 1, 3, 3)
    with pytest.raises(RuntimeError):
        with layers.default_impl("explicit") as name:
            assert name == "explicit" and layers.get_default_impl() == "explicit"
            layers.conv2d(p, x)
            raise RuntimeError("leave the block")
    assert layers.get_default_impl() == "fast" and calls == []


def test_unknown_formulation_is_rejected_everywhere():
    with pytest.raises(ValueError, match=r"set_default_impl: expected impl to be one of \('fast', "
                                         r"'explicit'\), got 'slow'"):
        layers.set_default_impl("slow")
    with pytest.raises(ValueError, match=r"default_impl: expected impl to be one of"):
        with layers.default_impl("Fast"):
            pass
    with pytest.raises(ValueError, match=r"relu: expected impl to be one of .*got 'slow'"):
        layers.relu(torch.ones(1), impl="slow")
    assert _impl.IMPLS == ("fast", "explicit")


@pytest.mark.parametrize("name", ["linear", "conv2d", "max_pool2d", "adaptive_avg_pool2d",
                                  "batch_norm", "dropout", "relu", "gelu", "flatten", "log_softmax",
                                  "cross_entropy"])
def test_every_layer_function_takes_an_impl_keyword(name):
    import inspect
    sig = inspect.signature(getattr(layers, name))
    assert sig.parameters["impl"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["impl"].default is None


# Each layer with two formulations (the activations have their own test), called on a valid input:
# an unknown formulation is refused with the layer's own name, before anything runs.
_LAYER_CALLS = {
    "batch_norm": lambda impl: layers.batch_norm({}, {"running_mean": torch.zeros(3), "running_var": torch.ones(3),
                                                      "num_batches_tracked": torch.tensor(0)},
                                                 torch.ones(2, 3, 2, 2), train=False, impl=impl),
    "conv2d": lambda impl: layers.conv2d({"weight": torch.ones(1, 3, 1, 1)}, torch.ones(2, 3, 2, 2), impl=impl),
    "dropout": lambda impl: layers.dropout(torch.ones(2, 3), p=0.5, train=True, key=layers.random.key(0), impl=impl),
    "linear": lambda impl: layers.linear({"weight": torch.ones(2, 3)}, torch.ones(4, 3), impl=impl),
    "cross_entropy": lambda impl: layers.cross_entropy(torch.ones(2, 3), torch.tensor([0, 1]), impl=impl),
    "max_pool2d": lambda impl: layers.max_pool2d(torch.ones(1, 1, 2, 2), 2, impl=impl),
    "adaptive_avg_pool2d": lambda impl: layers.adaptive_avg_pool2d(torch.ones(1, 1, 2, 2), 1, impl=impl),
}


@pytest.mark.parametrize("layer", sorted(_LAYER_CALLS))
def test_every_layer_refuses_an_unknown_formulation_naming_itself_and_runs_both_known_ones(layer):
    call = _LAYER_CALLS[layer]
    for bad in ("nope", "Fast", 1):
        with pytest.raises(ValueError, match=rf"^{layer}: expected impl to be one of \('fast', 'explicit'\), "
                                             rf"got {re.escape(repr(bad))}$"):
            call(bad)
    for impl in ("fast", "explicit", None):
        call(impl)
