"""The optimizers: ``sgd``, ``adam`` and ``adamw``, each torch.optim's algorithm exactly.

    sgd   = chain([negate], [add_decayed_weights], [trace], scale_by_learning_rate)
    adam  = chain([negate], [add_decayed_weights], scale_by_adam)
    adamw = chain([negate], scale_by_adam(weight_decay=...))     (decoupled decay)

Stages in brackets are present only when their option is on, as torch skips them. Every
hyperparameter is validated with torch's own condition.

**Tensor hyperparameters.** ``lr``, ``momentum``, ``weight_decay`` and ``betas`` may also be 0-d
floating tensors, as optax's ``inject_hyperparams`` makes them: built inside a function that
``torch.func.vmap`` maps over ensemble members, each member gets its own values. A tensor option
always keeps its stage (its value may be 0 for some members: ``b_t = 0 * b + g = g`` and
``g + 0 * p = g`` give the same bits as leaving the stage out), and it is validated only where
its value can be read (not under ``vmap``: validate the grid before, as ``experiments.sweep``
does). With Python numbers everything is exactly as before.
"""
from __future__ import annotations

from numbers import Real

import torch

from .adam import scale_by_adam
from .base import GradientTransformation, is_traced
from .combine import chain
from .decay import add_decayed_weights
from .momentum import trace
from .scale import negate, scale_by_learning_rate


def _number(fn: str, name: str, value):
    """``value`` as a float, or a 0-d floating tensor as it is."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{fn}: expected {name} as a 0-d floating tensor, got {value.dtype} of "
                            f"shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{fn}: expected {name} to be a real number, got {type(value).__name__}")
    return float(value)


def _readable(value) -> float | None:
    """The value to validate: a float, a plain tensor's value, None under a torch.func transform."""
    if isinstance(value, torch.Tensor):
        return None if is_traced(value) else float(value)
    return value


def _on(value) -> bool:
    """Whether an option's stage is present: a tensor always, a number when it is not 0."""
    return isinstance(value, torch.Tensor) or value != 0


def _lr(fn: str, lr, invalid) -> object:
    """Check a float lr with torch's condition ``invalid``; schedules are taken as they are."""
    if callable(lr):
        return lr
    lr = _number(fn, "lr (a float or a schedule step -> lr)", lr)
    if _readable(lr) is not None and invalid(_readable(lr)):
        raise ValueError(f"{fn}: Invalid learning rate: expected lr >= 0, got {_readable(lr)}")
    return lr


def _flag(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: expected {name} to be a bool, got {type(value).__name__}")
    return value


def sgd(lr, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False, maximize: bool = False, weight_decay_mask=None) -> GradientTransformation:
    """torch.optim.SGD.

        g <- -g (maximize);  g <- g + lambda p (weight decay, mask-selected leaves)
        b_1 = g;  b_t = mu b_{t-1} + (1 - dampening) g;  d = g + mu b_t (nesterov) or b_t
        p <- p - lr_t d

    lr: float or schedule ``step -> lr``. weight_decay_mask: tree of bools / callable (False =
    no decay; torch: a second param group with weight_decay=0), e.g.
    ``optim.decay_mask_no_bias_or_norm``.
    """
    fn = "sgd"
    lr = _lr(fn, lr, lambda x: x < 0.0)
    momentum = _number(fn, "momentum", momentum)
    dampening = _number(fn, "dampening", dampening)
    weight_decay = _number(fn, "weight_decay", weight_decay)
    nesterov, maximize = _flag(fn, "nesterov", nesterov), _flag(fn, "maximize", maximize)
    mom, wd = _readable(momentum), _readable(weight_decay)
    if mom is not None and mom < 0.0:
        raise ValueError(f"{fn}: Invalid momentum value: expected momentum >= 0, got {mom}")
    if wd is not None and wd < 0.0:
        raise ValueError(f"{fn}: Invalid weight_decay value: expected weight_decay >= 0, got {wd}")
    if nesterov and ((mom is not None and mom <= 0) or dampening != 0):
        raise ValueError(f"{fn}: Nesterov momentum requires a momentum and zero dampening: expected "
                         f"momentum > 0 and dampening == 0, got momentum={mom}, dampening={dampening}")
    stages = []
    if maximize:
        stages.append(negate())
    if _on(weight_decay):
        stages.append(add_decayed_weights(weight_decay, weight_decay_mask))
    if _on(momentum):
        stages.append(trace(momentum, dampening, nesterov))
    stages.append(scale_by_learning_rate(lr))
    return chain(*stages)


def _adam_checks(fn, lr, betas, eps, weight_decay, amsgrad, maximize):
    lr = _lr(fn, lr, lambda x: not 0.0 <= x)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{fn}: expected betas to be a pair (beta1, beta2), got {betas!r}")
    b1, b2 = (_number(fn, f"betas[{i}]", b) for i, b in enumerate(betas))
    eps = float(_number(fn, "eps", eps))
    weight_decay = _number(fn, "weight_decay", weight_decay)
    if not 0.0 <= eps:
        raise ValueError(f"{fn}: Invalid epsilon value: expected eps >= 0, got {eps}")
    for i, b in enumerate((_readable(b1), _readable(b2))):
        if b is not None and not 0.0 <= b < 1.0:
            raise ValueError(f"{fn}: Invalid beta parameter at index {i}: expected 0 <= betas[{i}] "
                             f"< 1, got {b}")
    if _readable(weight_decay) is not None and not 0.0 <= _readable(weight_decay):
        raise ValueError(f"{fn}: Invalid weight_decay value: expected weight_decay >= 0, got "
                         f"{_readable(weight_decay)}")
    return lr, b1, b2, eps, weight_decay, _flag(fn, "amsgrad", amsgrad), _flag(fn, "maximize", maximize)


def adam(lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
         amsgrad: bool = False, maximize: bool = False, weight_decay_mask=None) -> GradientTransformation:
    """torch.optim.Adam: L2 decay added to the gradient, then the Adam step (see optim.adam)."""
    lr, b1, b2, eps, weight_decay, amsgrad, maximize = _adam_checks(
        "adam", lr, betas, eps, weight_decay, amsgrad, maximize)
    stages = [negate()] if maximize else []
    if _on(weight_decay):
        stages.append(add_decayed_weights(weight_decay, weight_decay_mask))
    stages.append(scale_by_adam(lr, b1, b2, eps, amsgrad))
    return chain(*stages)


def adamw(lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
          amsgrad: bool = False, maximize: bool = False, weight_decay_mask=None) -> GradientTransformation:
    """torch.optim.AdamW: ``p <- p (1 - lr_t lambda)`` before the moments, then the Adam step."""
    lr, b1, b2, eps, weight_decay, amsgrad, maximize = _adam_checks(
        "adamw", lr, betas, eps, weight_decay, amsgrad, maximize)
    stages = [negate()] if maximize else []
    stages.append(scale_by_adam(lr, b1, b2, eps, amsgrad, weight_decay, weight_decay_mask))
    return chain(*stages)
