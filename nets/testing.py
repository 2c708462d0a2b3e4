"""Property-based checks of a pure net against its torch.nn twin: a public testing library.

A net is ``nets.Net(init, apply)`` whose ``params`` and ``state`` are keyed like the twin's
``state_dict()`` (docs/architecture.md), so ``torch.func.functional_call(twin, {**params,
**state}, x)`` is its reference. :func:`check_net` draws a seed, a batch size and train or eval,
and checks

* the names and shapes of ``params`` and ``state`` against the twin's ``state_dict()`` (and that
  ``state`` is the twin's buffers);
* the logits, the gradient of a cross-entropy loss with respect to every parameter (torch.func
  on ours, plain autograd on the twin), and the new batch-norm state, in train and in eval;
* that eval returns the state it was given.

Running statistics are moved away from their (0, 1) start first, so eval really reads them.
Dropout is not drawn by torch's generator: build both sides without it (its own tests are in
``layers.testing``). A failure prints hypothesis's shrunk draws and ``@reproduce_failure`` line.

    import nets
    from nets.testing import check_net
    check_net(lambda: nets.model_b(dropout=0.0, head_dropout=0.0), make_twin, (3, 32, 32))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layers

__all__ = ["check_net", "check_state_dict_names", "perturbed_state", "twin_call"]

#: float64 on both sides: the same convolution and matmul kernels; differences come only from the
#: summation order of batch-norm statistics and its backward (a few ulps of O(1) values,
#: amplified along the depth and by ~10^4-term reductions in the gradients): 1e-9 relative is far
#: above that (~1e-13 seen) and far below any real mistake.
RTOL, ATOL = 1e-9, 1e-11


def perturbed_state(state, generator):
    """Running statistics away from their (0, 1) start (mean N(0, 0.01), variance in [0.5, 1.5)),
    so eval mode really uses them; other entries cloned."""
    out = {}
    for k, v in state.items():
        if k.endswith("running_mean"):
            out[k] = 0.1 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=generator, dtype=v.dtype)
        else:
            out[k] = v.clone()
    return out


def twin_call(module, params, state, x, *, train):
    """``(output, new_state)`` of ``module`` run with ``params`` and clones of ``state``
    (functional_call writes new batch-norm statistics into the buffers it is given)."""
    module.train(train)
    buffers = {k: v.clone() for k, v in state.items()}
    out = torch.func.functional_call(module, {**params, **buffers}, (x,))
    return out, buffers


def check_state_dict_names(net, twin):
    """``{**params, **state}`` has the twin's ``state_dict()`` names and shapes, ``state`` is
    exactly its buffers, and no name is in both."""
    params, state = net.init(layers.random.key(0))
    ours = {k: tuple(v.shape) for k, v in {**params, **state}.items()}
    theirs = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert ours == theirs, (f"names and shapes differ from the twin's state_dict: only ours "
                            f"{sorted(set(ours) - set(theirs))}, only the twin's "
                            f"{sorted(set(theirs) - set(ours))}, other shapes "
                            f"{sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])}")
    assert not set(params) & set(state), f"in both params and state: {sorted(set(params) & set(state))}"
    buffers = {k for k, _ in twin.named_buffers()}
    assert set(state) == buffers, f"state {sorted(state)} is not the twin's buffers {sorted(buffers)}"


def check_net(make_net, make_twin, input_shape, *, num_classes=10, max_examples=2, batch_sizes=(2, 3),
              train=(True, False), rtol=RTOL, atol=ATOL):
    """Check ``make_net()`` against ``make_twin()`` (see the module docstring) in float64, over
    ``max_examples`` draws of a seed, a batch size from ``batch_sizes`` and train / eval, with
    inputs of shape ``(batch, *input_shape)`` and labels in ``range(num_classes)``."""
    check_state_dict_names(make_net(), make_twin())

    @settings(max_examples=max_examples, deadline=None, print_blob=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.integers(0, 2**31 - 1), batch=st.sampled_from(tuple(batch_sizes)),
           training=st.sampled_from(tuple(train)))
    def check_drawn(seed, batch, training):
        net, module = make_net(), make_twin().to(torch.float64)
        gen = torch.Generator().manual_seed(seed)
        params, state = net.init(layers.random.key(seed), dtype=torch.float64)
        state = perturbed_state(state, gen)
        x = torch.randn((batch, *input_shape), generator=gen, dtype=torch.float64)
        labels = torch.randint(0, num_classes, (batch,), generator=gen)

        def loss(p):
            logits, new_state = net.apply(p, state, x, train=training)
            return F.cross_entropy(logits, labels), (logits, new_state)

        grads, (logits, new_state) = torch.func.grad(loss, has_aux=True)(params)
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        ref_logits, ref_state = twin_call(module, leaves, state, x, train=training)
        ref_grads = torch.autograd.grad(F.cross_entropy(ref_logits, labels), list(leaves.values()))

        mode = "train" if training else "eval"
        torch.testing.assert_close(logits, ref_logits.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{mode}: logits: {m}")
        assert list(grads) == list(params), f"{mode}: gradient names {list(grads)}"
        for k, g in zip(leaves, ref_grads):
            torch.testing.assert_close(grads[k], g, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{mode}: gradient of {k}: {m}")
        assert list(new_state) == list(state), f"{mode}: state names {list(new_state)}"
        for k in state:
            torch.testing.assert_close(new_state[k], ref_state[k], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{mode}: state {k}: {m}")
            if not training:
                assert new_state[k] is state[k] or torch.equal(new_state[k], state[k]), \
                    f"eval changed state {k}"

    check_drawn()
