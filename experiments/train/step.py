"""The pure training step and the eval function, with the speed options they share.

* :func:`make_step` builds ``step(params, state, opt_state, batch, key) -> (params, state,
  opt_state, metrics)``: ``torch.func.grad_and_value`` of the loss with the new batch-norm state
  as aux, then the optimizer step. Nothing the caller holds is changed in place.
* :func:`make_eval` builds ``predict(params, state, x) -> logits``, optionally averaging the
  logits over test-time views (:func:`tta_views`: mirror and shifts).

Both take the speed options: ``bf16`` (forward under ``torch.autocast``), ``channels_last``
(inputs in channels-last memory format; give the net channels-last parameters too with
:func:`to_channels_last`) and, for the step, ``compile``.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils import _pytree as pytree

import optim

__all__ = ["make_step", "make_eval", "translate", "tta_views", "to_channels_last"]


def to_channels_last(tree):
    """Every 4-D tensor leaf of ``tree`` in ``torch.channels_last`` memory format (values unchanged)."""
    return pytree.tree_map(
        lambda t: t.contiguous(memory_format=torch.channels_last)
        if isinstance(t, torch.Tensor) and t.dim() == 4 else t, tree)


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _widen(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (from autocast) to float32; float32/float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def make_step(net, opt, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
              bf16: bool = False, channels_last: bool = False, compile: bool = False,
              reduce: Callable | None = None, donate: bool = False) -> Callable:
    """Build ``step(params, state, opt_state, (x, y), key) -> (params, state, opt_state, metrics)``.

    ``(grads, (loss, (state', logits))) = grad_and_value(L, has_aux=True)(params, state, x, y, key)``
    with ``L = loss_fn(net.apply(params, state, x, train=True, key=key)[0], y)``;
    ``params', opt_state' = optim.step(opt, grads, opt_state, params)``, which equals
    ``opt.update`` + ``optim.apply_updates`` (docs/optim.md says which path it runs).

    Args:
      net: a ``Net(init, apply)``. opt: a ``GradientTransformation(init, update)``.
      loss_fn: ``(logits (N, K), y (N,) int64) -> scalar``.
      bf16: run the forward under ``torch.autocast(bfloat16)``; the loss is taken in float32.
      channels_last: hand ``x`` to the net in channels-last memory format (give the net
        channels-last parameters too, :func:`to_channels_last`).
      compile: ``torch.compile`` the net's forward and backward (the optimizer update stays
        eager: its schedule is host arithmetic on the step count).
      reduce: ``(grads, metrics) -> (grads, metrics)`` between the backward pass and the
        update: data parallelism averages the gradients and sums the metrics over the processes
        there (:mod:`experiments.train.distributed`). None: nothing in between.
      donate: the step owns ``params`` and ``opt_state`` and writes the new values into their
        storage (``optim.step(..., donate=True)``: torch.optim's in-place foreach ops,
        bit-identical to the pure update); the caller must not read the trees it passed in
        again. :func:`~experiments.train.loop.fit` donates whenever nothing else holds them.

    ``metrics`` holds 0-d tensors ``loss`` (mean over the batch) and ``correct`` (count), or
    ``(K,)`` tensors for an ensemble (``nets.ensemble``: logits ``(K, B, classes)``, a loss per
    member; its parameters are updated by ``optim.vmapped``).
    """
    def loss_of(params, state, x, y, key):
        with _autocast(x.device, bf16):
            logits, new_state = net.apply(params, state, x, train=True, key=key)
        logits = _widen(logits)
        loss = loss_fn(logits, y)
        # An ensemble's loss is one per member; their sum has each member's gradient with
        # respect to its own parameters (the members share none).
        return (loss if loss.dim() == 0 else loss.sum()), (new_state, logits, loss)

    grad_and_value = torch.func.grad_and_value(loss_of, has_aux=True)

    def forward_backward(params, state, x, y, key):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grads, (_, (new_state, logits, loss)) = grad_and_value(params, state, x, y, key)
        return grads, new_state, {"loss": loss.detach(), "correct": (logits.argmax(-1) == y).sum(-1)}

    if compile:
        # Only the net's forward and backward are compiled. The optimizer stays eager: its
        # schedule is host arithmetic on the step count (int(count), a graph break and a new
        # constant every step under torch.compile), and its foreach update is a few
        # memory-bound passes over the parameters that compiling would not speed up.
        forward_backward = torch.compile(forward_backward)

    def step(params, state, opt_state, batch, key):
        x, y = batch
        grads, new_state, metrics = forward_backward(params, state, x, y, key)
        if reduce is not None:
            grads, metrics = reduce(grads, metrics)
        new_params, new_opt_state = optim.step(opt, grads, opt_state, params, donate=donate)
        return new_params, new_state, new_opt_state, metrics

    return step


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x (N, C, H, W)`` moved down by ``dy`` and right by ``dx`` pixels (negative: up / left).

    ``out[..., i, j] = xr[..., i - dy, j - dx]`` where ``xr`` is ``x`` extended by reflection
    (``torch.nn.functional.pad(mode="reflect")``), so no border value is invented and the
    result does not depend on the normalisation. ``|dy|, |dx|`` must be below ``H``, ``W``.
    """
    s = max(abs(dy), abs(dx))
    if s == 0:
        return x
    h, w = x.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        raise ValueError(f"translate: expected shifts smaller than the image ({h}x{w}), got ({dy}, {dx})")
    padded = torch.nn.functional.pad(x, (s, s, s, s), mode="reflect")
    return padded[..., s - dy:s - dy + h, s - dx:s - dx + w]


def tta_views(tta_flip: bool = False, tta_shift: int = 0) -> list[tuple[bool, int, int]]:
    """The ``(mirror, dy, dx)`` views test-time augmentation averages over.

    ``{no mirror} (+ {mirror} with tta_flip) x {(0, 0)} (+ {(s, s), (-s, -s)} with tta_shift = s)``:
    1, 2, 3 or 6 views; the diagonal pair is airbench's choice of translations.
    """
    if isinstance(tta_shift, bool) or not isinstance(tta_shift, int) or tta_shift < 0:
        raise ValueError(f"make_eval: expected tta_shift to be a whole number of pixels >= 0, "
                         f"got {tta_shift!r}")
    shifts = [(0, 0)] + ([(tta_shift, tta_shift), (-tta_shift, -tta_shift)] if tta_shift else [])
    return [(m, dy, dx) for m in ((False, True) if tta_flip else (False,)) for dy, dx in shifts]


def check_shift_weight(shift_weight) -> None:
    """Refuse (ValueError, one line) a ``tta_shift_weight`` that is neither None nor in [0, 1]."""
    if shift_weight is not None and not (isinstance(shift_weight, (int, float))
                                         and not isinstance(shift_weight, bool)
                                         and 0 <= shift_weight <= 1):
        raise ValueError(f"make_eval: expected tta_shift_weight to be a number in [0, 1] (or "
                         f"none: every view weighs the same), got {shift_weight!r}")


def make_eval(net, *, tta_flip: bool = False, tta_shift: int = 0, bf16: bool = False,
              channels_last: bool = False, shift_weight: float | None = None) -> Callable:
    """Build ``predict(params, state, x (N, C, H, W) float) -> logits (N, K)`` (eval mode; float32
    at least, bfloat16 logits are widened).

    Test-time augmentation averages the logits over the views of :func:`tta_views`:
    ``logits = mean_v f(view_v(x))``; ``tta_flip`` adds the mirror (flip of the width axis),
    ``tta_shift = s`` the translations by ``(s, s)`` and ``(-s, -s)`` (:func:`translate`) of
    each. Without either, ``logits = f(x)``. With ``tta_shift`` and ``shift_weight = w``, the
    translated views share the weight ``w`` and the others ``1 - w``:

        logits = (1 - w) mean_{unshifted v} f(view_v(x)) + w mean_{shifted v} f(view_v(x))

    (airbench94: ``w = 1/2``, so each unshifted view weighs 1/4 and each shifted one 1/8 with the
    mirror on); None weighs every view the same (``w = 2/3``).
    """
    views = tta_views(tta_flip, tta_shift)
    check_shift_weight(shift_weight)
    if shift_weight is None or not tta_shift:
        weights = [1.0 / len(views)] * len(views)
    else:
        n_shifted = sum(1 for _, dy, _ in views if dy)
        n_centre = len(views) - n_shifted
        weights = [shift_weight / n_shifted if dy else (1 - shift_weight) / n_centre
                   for _, dy, _ in views]
    uniform = len(set(weights)) == 1

    def predict(params, state, x):
        with torch.no_grad(), _autocast(x.device, bf16):
            logits = None
            for (mirror, dy, dx), weight in zip(views, weights):
                v = translate(x.flip(-1) if mirror else x, dy, dx)
                if channels_last:
                    v = v.contiguous(memory_format=torch.channels_last)
                out = _widen(net.apply(params, state, v, train=False)[0])
                out = out if uniform else out * weight
                logits = out if logits is None else logits + out
        # uniform: the sum divided once (bit-identical to the mean before weights existed)
        return logits if len(views) == 1 or not uniform else logits / len(views)

    return predict
