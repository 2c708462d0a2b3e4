"""Optimizers as pure ``(init, update)`` pairs over pytrees, in the optax style, computing
torch.optim's algorithms with the same foreach operations (see docs/optim.md).

    opt = optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                    weight_decay_mask=optim.decay_mask_no_bias_or_norm)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = optim.apply_updates(params, updates)
    # or, fused (one pass over memory less):
    params, state = optim.step(opt, grads, state, params)
    # or, fused and writing into the storage of params and state, which are handed over
    # (the old trees must not be used afterwards):
    params, state = optim.step(opt, grads, state, params, donate=True)

Training runs ``optim.step`` (the last stage's ``fused_step``, after the other stages' ``update``
or, donating, ``donated_update``); ``update`` is the same math, because each stage writes its
arithmetic once, in one kernel that all three entry points wrap (``optim.base.transformation``).
"""
from .adam import ScaleByAdamState, scale_by_adam
from .alias import adam, adamw, sgd
from .base import (EmptyState, GradientTransformation, apply_updates, current_lr, current_step,
                   step)
from .clipping import clip_by_global_norm, global_norm
from .combine import MaskedState, MultiTransformState, chain, freeze, masked, multi_transform
from .decay import add_decayed_weights
from .ensemble import VmappedState, member_lrs, vmapped
from .masks import decay_mask_no_bias_or_norm
from .momentum import TraceState, trace
from .scale import LearningRateState, negate, scale_by_learning_rate, set_to_zero
from .schedules import (constant_schedule, cosine_annealing_schedule, exponential_schedule,
                        join_schedules, linear_schedule, multistep_schedule, one_cycle_schedule,
                        step_decay_schedule, triangular_schedule,
                        warmup_cosine_schedule)

__all__ = [
    "GradientTransformation", "EmptyState", "apply_updates", "step", "current_lr", "current_step",
    "sgd", "adam", "adamw",
    "chain", "masked", "multi_transform", "freeze", "MaskedState", "MultiTransformState",
    "negate", "scale_by_learning_rate", "set_to_zero", "LearningRateState",
    "trace", "TraceState", "add_decayed_weights", "scale_by_adam", "ScaleByAdamState",
    "clip_by_global_norm", "global_norm", "decay_mask_no_bias_or_norm", "vmapped", "VmappedState", "member_lrs",
    "constant_schedule", "step_decay_schedule", "multistep_schedule", "exponential_schedule",
    "cosine_annealing_schedule", "linear_schedule", "one_cycle_schedule", "join_schedules",
    "warmup_cosine_schedule", "triangular_schedule",
]
