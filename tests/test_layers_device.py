"""Every layer runs on the device and in the dtype of its inputs (CPU always; CUDA when present),
and both formulations there agree with the fast formulation on CPU in float64."""
import pytest
import torch

import layers
from layers import random as jr

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# float32 (and TF32-free float64) against a float64 CPU reference: reductions of <= 2*3*3 = 18
# O(1) terms, float32 eps 6e-8 -> ~1e-6; 1e-4 also covers CUDA's reordered reductions.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def suite(device, dtype):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    x = mk(3, 2, 6, 6)
    conv_p = {"weight": mk(4, 2, 3, 3), "bias": mk(4)}
    lin_p = {"weight": mk(5, 2 * 6 * 6), "bias": mk(5)}
    bn_p = {"weight": mk(2), "bias": mk(2)}
    bn_s = {"running_mean": mk(2), "running_var": mk(2).abs() + 0.5,
            "num_batches_tracked": torch.tensor(2, device=device)}
    target = torch.tensor([1, 0, 4], device=device)
    key = jr.key(1, device=device)
    return {
        "linear": lambda i: layers.linear(lin_p, layers.flatten(x, impl=i), impl=i),
        "conv2d": lambda i: layers.conv2d(conv_p, x, stride=2, padding=1, impl=i),
        "max_pool2d": lambda i: layers.max_pool2d(x, 3, 2, 1, ceil_mode=True, impl=i),
        "adaptive_avg_pool2d": lambda i: layers.adaptive_avg_pool2d(x, (4, 5), impl=i),
        "batch_norm": lambda i: layers.batch_norm(bn_p, bn_s, x, train=True, momentum=None, impl=i),
        "dropout": lambda i: layers.dropout(x, p=0.4, train=True, key=key, impl=i),
        "relu": lambda i: layers.relu(x, impl=i),
        "gelu": lambda i: layers.gelu(x, impl=i),
        "log_softmax": lambda i: layers.log_softmax(x, 1, impl=i),
        "cross_entropy": lambda i: layers.cross_entropy(x[:, :, 0, :5].reshape(3, 10)[:, :5], target,
                                                        label_smoothing=0.2, impl=i),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_every_layer_keeps_device_and_dtype_and_matches_cpu_float64(device, dtype, impl):
    reference = suite("cpu", torch.float64)
    for name, f in suite(device, dtype).items():
        out = f(impl)
        ref = reference[name]("fast")
        if name == "batch_norm":
            (out, state), (ref, ref_state) = out, ref
            for k in ("running_mean", "running_var"):
                assert state[k].device.type == device and state[k].dtype == dtype, name
                torch.testing.assert_close(state[k].cpu().double(), ref_state[k], **TOL[dtype])
            assert int(state["num_batches_tracked"]) == 3
        assert out.device.type == device and out.dtype == dtype, name
        torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype], msg=lambda m: f"{name}: {m}")
