"""How closely a net run as a JAX function (:func:`nets.jax_apply`) follows the torch run.

For each net, one jitted ``jax.value_and_grad`` of a training step (dropout keyed, batch
statistics, cross-entropy) against ``torch.func.grad_and_value`` of the same step in torch, from
the same parameters: the relative 2-norm differences of the logits, the gradients and the new
state (running statistics), and the compile time.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

import layers
import nets

__all__ = ["NETS", "net_agreement", "agreement_table"]

#: Nets checked, with the input they get: Models A, B, C on CIFAR-sized images, VGG16 (the
#: transfer studies' net, ImageNet head) on 32x32 images to keep its compilation short.
NETS = {
    "model_a": (lambda: nets.model_a(), (3, 32, 32)),
    "model_b": (lambda: nets.model_b(), (3, 32, 32)),
    "model_c": (lambda: nets.model_c(), (3, 32, 32)),
    "vgg16": (lambda: nets.vgg16(num_classes=10), (3, 32, 32)),
}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.double().norm())
    diff = float((got.double() - want.double()).norm())
    return diff / scale if scale else diff


def _tree_relative(got: dict, want: dict) -> float:
    diff = sum(float((got[k].double() - want[k].double()).norm()) ** 2 for k in want)
    scale = sum(float(want[k].double().norm()) ** 2 for k in want)
    return math.sqrt(diff / scale) if scale else math.sqrt(diff)


def net_agreement(name: str, *, dtype: torch.dtype = torch.float64, batch: int = 4,
                  seed: int = 0, impl: str = "fast") -> dict[str, Any]:
    """``{"logits", "grads", "state"}`` relative differences (``state`` None for a net without
    running statistics) and ``compile_s`` for ``NETS[name]``."""
    import jax
    import optax
    jax.config.update("jax_enable_x64", True)
    build, shape = NETS[name]
    net = build()
    params, state = net.init(layers.random.key(seed), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + shape, dtype=dtype, generator=g)
    num_classes = net.apply(params, state, x[:1], train=False)[0].shape[1]
    y = torch.randint(0, num_classes, (batch,), generator=g)
    key = layers.random.key(seed + 1)

    def loss(params):
        logits, new_state = net.apply(params, state, x, train=True, key=key)
        return layers.cross_entropy(logits, y), (logits, new_state)
    with layers.default_impl(impl):
        grads, (_, (logits, new_state)) = torch.func.grad_and_value(loss, has_aux=True)(params)

    apply = nets.jax_apply(net, impl=impl)

    def jax_loss(params, state, x, y, key):
        logits, new_state = apply(params, state, x, train=True, key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, new_state)
    step = jax.jit(jax.value_and_grad(jax_loss, has_aux=True))
    args = nets.to_jax((params, state, x, y, key))
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    (_, (j_logits, j_state)), j_grads = compiled(*args)
    float_state = [k for k, v in new_state.items() if v.is_floating_point()]
    return {"net": name, "dtype": str(dtype).removeprefix("torch."), "impl": impl,
            "logits": _relative(nets.from_jax(j_logits), logits),
            "grads": _tree_relative(nets.from_jax(j_grads), grads),
            "state": _tree_relative({k: nets.from_jax(j_state[k]) for k in float_state},
                                    {k: new_state[k] for k in float_state}) if float_state else None,
            "compile_s": compile_s}


def agreement_table(names=()) -> list[dict[str, Any]]:
    """:func:`net_agreement` of each net of ``names`` (all of :data:`NETS` when empty), in
    float64 and float32, printed as a Markdown table as it goes; returns the rows."""
    unknown = [n for n in names if n not in NETS]
    if unknown:
        raise ValueError(f"--agreement: expected nets among {', '.join(NETS)}, got {', '.join(unknown)}")
    rows = []
    print("| net | dtype | logits | gradients | running stats | compile s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in names or list(NETS):
        for dtype in (torch.float64, torch.float32):
            r = net_agreement(name, dtype=dtype)
            rows.append(r)
            state = "no state" if r["state"] is None else f"{r['state']:.1e}"
            print(f"| {name} | {r['dtype']} | {r['logits']:.1e} | {r['grads']:.1e} | {state} "
                  f"| {r['compile_s']:.1f} |", flush=True)
    return rows
