"""Trajectory parity: optim.sgd / adam / adamw against torch.optim (foreach=True), step by step.

Each example draws a parameter tree (assorted shapes, float32 and float64 leaves), the
optimizer's hyperparameters over their whole valid range, a learning-rate schedule (built twice:
ours and torch.optim.lr_scheduler's), an optional weight-decay mask (torch: a second param group
with weight_decay=0) and an optional set of frozen parameters (torch: their grad is None). Both
``update`` + ``apply_updates`` and the fused ``optim.step`` are checked after every step.
"""
import pytest
import torch

import optim
from optim.testing import SHAPES, adam_hyperparameters, check_optimizer, sgd_hyperparameters

# Tolerance: optim.testing.tolerance, 10 * steps * eps(dtype) after `steps` steps (its docstring
# gives the reason); the fused step against torch's foreach step is also checked bit for bit below.


def test_sgd_trajectory_equals_torch_sgd():
    """20 steps of optim.sgd and torch.optim.SGD (foreach) over drawn lr (0 too), momentum,
    dampening, Nesterov, weight decay, maximize, schedules, decay masks and frozen leaves."""
    check_optimizer(lambda lr, mask, **hp: optim.sgd(lr, weight_decay_mask=mask, **hp),
                    lambda groups, lr, **hp: torch.optim.SGD(groups, lr=lr, foreach=True, **hp),
                    sgd_hyperparameters(), max_examples=25)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_trajectory_equals_torch_adam(name):
    """20 steps of optim.adam / adamw and torch.optim.Adam / AdamW (foreach) over drawn lr,
    betas, eps (0 too), weight decay, amsgrad, maximize, schedules, masks and frozen leaves."""
    ours = optim.adam if name == "adam" else optim.adamw
    theirs = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    check_optimizer(lambda lr, mask, **hp: ours(lr, weight_decay_mask=mask, **hp),
                    lambda groups, lr, **hp: theirs(groups, lr=lr, foreach=True, **hp),
                    adam_hyperparameters(), max_examples=20)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("make_ours, make_torch", [
    (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)),
    (lambda: optim.adamw(1e-2, weight_decay=0.1, amsgrad=True),
     lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=True)),
    (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, foreach=True)),
    (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, maximize=True),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                               maximize=True, foreach=True)),
    (lambda: optim.adam(1e-2, weight_decay=1e-2, amsgrad=True, maximize=True),
     lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True, maximize=True, foreach=True)),
])
def test_fused_step_is_bit_identical_to_torch_foreach_step_in_float64(make_ours, make_torch, donate):
    g = torch.Generator().manual_seed(0)
    params = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    tparams = [torch.nn.Parameter(p.clone()) for p in params.values()]
    opt, topt = make_ours(), make_torch(tparams)
    state = opt.init(params)
    for _ in range(30):
        grads = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        for tp, gr in zip(tparams, grads.values()):
            tp.grad = gr.clone()
        topt.step()
        params, state = optim.step(opt, grads, state, params, donate=donate)
    for ours, theirs in zip(params.values(), tparams):
        assert torch.equal(ours, theirs.detach())


@pytest.mark.parametrize("ours, theirs", [
    (lambda: optim.adam(), lambda p: torch.optim.Adam(p)),
    (lambda: optim.adamw(), lambda p: torch.optim.AdamW(p)),
    (lambda: optim.chain(optim.scale_by_adam()), lambda p: torch.optim.Adam(p)),
    (lambda: optim.adam(amsgrad=True), lambda p: torch.optim.Adam(p, amsgrad=True)),
    (lambda: optim.adamw(weight_decay=1.0), lambda p: torch.optim.AdamW(p, weight_decay=1.0)),
], ids=["adam", "adamw", "scale_by_adam", "adam amsgrad", "adamw decay 1"])
def test_the_defaults_are_torch_optims_defaults(ours, theirs):
    # every default (lr, betas, eps, weight decay, amsgrad) shows in a few steps' bits
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, generator=g, dtype=torch.float64)}
    # growing, then shrinking gradients: amsgrad's maximum then differs from the second moment
    grads = [{"w": torch.randn(5, generator=g, dtype=torch.float64) * 10 ** k} for k in (-9, 0, 2, -3, -9)]
    opt, ref = ours(), params["w"].clone().requires_grad_(True)
    torch_opt = theirs([ref])
    p, s = params, opt.init(params)
    for grad in grads:
        p, s = optim.step(opt, grad, s, p)
        ref.grad = grad["w"].clone()
        torch_opt.step()
        assert torch.equal(p["w"], ref.detach())


def test_adam_without_weight_decay_is_the_adam_stage_alone_and_cosine_anneals_to_zero():
    # the state's layout is what checkpoints hold: no weight-decay stage unless one is asked for
    params = {"w": torch.ones(2)}
    assert len(optim.adam().init(params)) == 1 and len(optim.adam(weight_decay=0.1).init(params)) == 2
    assert optim.current_lr(optim.chain(optim.scale_by_adam(optim.linear_schedule(1.0, 0.5, 1.0, 4))).init(params)) == 0.5
    assert optim.cosine_annealing_schedule(1.0, 10)(10) == 0.0   # torch's eta_min default
