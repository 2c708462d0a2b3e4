"""torch.func on every layer, both formulations: grad, vmap (per-sample gradients) and jacrev."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

import layers
from layers import random as jr

IMPLS = ["fast", "explicit"]
D = torch.float64
# float64 throughout; per-sample results and full-batch results differ only in summation order
# over <= 4 * 8 * 3 * 3 terms, so 1e-10 is generous.
TOL = dict(rtol=1e-10, atol=1e-10)

# The explicit conv/pool backward under vmap uses torch's slow fallback for unfold_backward;
# correct, only slower, and these tests are tiny.
pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
              pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")]


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def small_net_params():
    return {
        "conv": {"weight": randn(4, 3, 3, 3, seed=1) * 0.3, "bias": randn(4, seed=2)},
        "bn": {"weight": randn(4, seed=3).abs() + 0.5, "bias": randn(4, seed=4)},
        "fc": {"weight": randn(5, 4 * 2 * 2, seed=5) * 0.3, "bias": randn(5, seed=6)},
    }


BN_STATE = {"running_mean": randn(4, seed=7) * 0.1, "running_var": randn(4, seed=8).abs() + 0.5,
            "num_batches_tracked": torch.tensor(3)}


def small_net(params, x, target, impl):
    """conv -> batch norm (eval) -> relu -> max pool -> adaptive avg pool -> flatten -> linear -> CE."""
    y = layers.conv2d(params["conv"], x, padding=1, impl=impl)
    y, _ = layers.batch_norm(params["bn"], BN_STATE, y, train=False, impl=impl)
    y = layers.max_pool2d(layers.relu(y, impl=impl), 2, impl=impl)
    y = layers.flatten(layers.adaptive_avg_pool2d(y, 2, impl=impl), impl=impl)
    y = layers.dropout(y, p=0.5, train=False, impl=impl)
    return layers.cross_entropy(layers.linear(params["fc"], y, impl=impl), target, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_of_grad_gives_per_sample_gradients_of_a_conv_pool_linear_net(impl):
    params = small_net_params()
    x, target = randn(4, 3, 8, 8, seed=9), torch.tensor([0, 3, 1, 4])

    def one(params, x, t):
        return small_net(params, x[None], t[None], impl)

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))(params, x, target)
    for i in range(4):
        expect = grad(one)(params, x[i], target[i])
        for group in expect:
            for k in expect[group]:
                torch.testing.assert_close(per_sample[group][k][i], expect[group][k], **TOL)
    # The per-sample gradients average to the full-batch gradient of the mean loss.
    full = grad(lambda p: small_net(p, x, target, impl))(params)
    for group in full:
        for k in full[group]:
            torch.testing.assert_close(per_sample[group][k].mean(0), full[group][k], **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_unbatched_inputs_equals_the_batched_call(impl):
    x = randn(3, 2, 7, 6, seed=10)
    p = {"weight": randn(4, 2, 3, 2, seed=11), "bias": randn(4, seed=12)}
    p_lin = {"weight": randn(5, 6, seed=13)}
    for f in (lambda x: layers.conv2d(p, x, stride=2, padding=1, impl=impl),
              lambda x: layers.max_pool2d(x, 3, 2, 1, ceil_mode=True, impl=impl),
              lambda x: layers.adaptive_avg_pool2d(x, (3, None), impl=impl),
              lambda x: layers.linear(p_lin, x, impl=impl),
              lambda x: layers.log_softmax(x, 1, impl=impl),
              lambda x: layers.relu(x, impl=impl),
              lambda x: layers.flatten(x, 0, impl=impl)):
        torch.testing.assert_close(vmap(f)(x), torch.stack([f(xi) for xi in x]), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_of_batch_norm_eval_and_dropout_over_keys(impl):
    x = randn(5, 2, 4, 3, 3, seed=14)        # 5 independent batches of (2, 4, 3, 3)
    f = lambda x: layers.batch_norm({}, BN_STATE, x, train=False, impl=impl)[0]   # noqa: E731
    torch.testing.assert_close(vmap(f)(x), torch.stack([f(xi) for xi in x]), **TOL)
    keys = jr.split(jr.key(0), 5)
    drop = lambda x, k: layers.dropout(x, p=0.5, train=True, key=k, impl=impl)    # noqa: E731
    torch.testing.assert_close(vmap(drop)(x, keys), torch.stack([drop(xi, k) for xi, k in zip(x, keys)]), **TOL)


def _jac_cases(impl):
    p_conv = {"weight": randn(2, 2, 2, 2, seed=20), "bias": randn(2, seed=21)}
    p_lin = {"weight": randn(3, 4, seed=22), "bias": randn(3, seed=23)}
    p_bn = {"weight": randn(2, seed=24).abs() + 0.5, "bias": randn(2, seed=25)}
    st = {"running_mean": torch.zeros(2, dtype=D), "running_var": torch.ones(2, dtype=D),
          "num_batches_tracked": torch.tensor(0)}
    x4 = randn(2, 2, 3, 4, seed=26)
    key = jr.key(3)
    target = torch.randint(0, 2, (2, 3, 4), generator=torch.Generator().manual_seed(28))
    return [
        ("linear", lambda x: layers.linear(p_lin, x, impl=impl), lambda x: F.linear(x, p_lin["weight"], p_lin["bias"]), randn(2, 4, seed=27)),
        ("conv2d", lambda x: layers.conv2d(p_conv, x, padding="same", impl=impl), lambda x: F.conv2d(x, p_conv["weight"], p_conv["bias"], padding="same"), x4),
        ("max_pool2d", lambda x: layers.max_pool2d(x, 2, 1, impl=impl), lambda x: F.max_pool2d(x, 2, 1), x4),
        ("adaptive_avg_pool2d", lambda x: layers.adaptive_avg_pool2d(x, 2, impl=impl), lambda x: F.adaptive_avg_pool2d(x, 2), x4),
        ("batch_norm", lambda x: layers.batch_norm(p_bn, st, x, train=True, impl=impl)[0],
         lambda x: F.batch_norm(x, None, None, p_bn["weight"], p_bn["bias"], training=True), x4),
        ("dropout", lambda x: layers.dropout(x, p=0.5, train=True, key=key, impl=impl),
         lambda x: x * jr.bernoulli(key, 0.5, x.shape, resolution_bits=16).to(D) * 2, x4),
        ("relu", lambda x: layers.relu(x, impl=impl), torch.relu, x4),
        ("gelu", lambda x: layers.gelu(x, impl=impl), F.gelu, x4),
        ("flatten", lambda x: layers.flatten(x, impl=impl), lambda x: torch.flatten(x, 1), x4),
        ("log_softmax", lambda x: layers.log_softmax(x, 1, impl=impl), lambda x: F.log_softmax(x, 1), x4),
        ("cross_entropy", lambda x: layers.cross_entropy(x, target, label_smoothing=0.1, impl=impl),
         lambda x: F.cross_entropy(x, target, label_smoothing=0.1), x4),
    ]


@pytest.mark.parametrize("impl", IMPLS)
def test_jacrev_of_every_layer_equals_torch_autograd_jacobian(impl):
    for name, ours, ref, x in _jac_cases(impl):
        jac = jacrev(ours)(x)
        expect = torch.autograd.functional.jacobian(ref, x)
        torch.testing.assert_close(jac, expect, **TOL, msg=lambda m: f"{name}: {m}")
