"""Shared validation helpers: shape and type checks only, never values of tensors.

Layers validate on the training hot path and under ``torch.func`` transforms, so these
helpers read ``.shape``, ``.dim()`` and ``.dtype`` (which transforms report per sample) and
never look at tensor values. Every error names the layer, what it expected and what it got.
"""
import numbers

import torch


def shape_str(t):
    """``(8, 3, 32, 32)`` for a tensor, ``(3,)`` for a vector, ``()`` for a scalar."""
    return str(tuple(t.shape))


def check_tensor(x, where, name="input"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected {name} to be a torch.Tensor, got {type(x).__name__}")


def check_floating(x, where, name="input"):
    check_tensor(x, where, name)
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{where}: expected {name} with a floating dtype, got {x.dtype}")


#: The floating dtypes an active ``torch.autocast`` casts to its own dtype (never float64, never
#: an integer dtype), so under autocast any mix of them reaches an op such as ``F.conv2d`` legitimately.
AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def autocasting(t):
    """Whether ``torch.autocast`` is active on ``t``'s device."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:            # a device type autocast does not know (meta): never autocast
        return False


def check_dtype(t, like, where, name, whose, *, autocast=False):
    """``t.dtype == like.dtype``, as torch's kernels require; ``whose`` names ``like`` in the
    error, which reads
    ``conv2d: expected input of dtype torch.float32 (the weight's), got torch.float64``.

    With ``autocast=True``, a mix of :data:`AUTOCAST_DTYPES` is accepted while ``torch.autocast``
    is active on ``t``'s device: the op casts both itself (a bfloat16 activation meets a float32
    weight on every bf16 training step). Autocast is only asked about on a mismatch.
    """
    if t.dtype == like.dtype:
        return
    if (autocast and t.dtype in AUTOCAST_DTYPES and like.dtype in AUTOCAST_DTYPES
            and autocasting(t)):
        return
    raise TypeError(f"{where}: expected {name} of dtype {like.dtype} (the {whose}), got {t.dtype}")


def weight_and_bias(params, x, where, rank, layout):
    """``(weight, bias or None)`` of a conv / linear ``params`` dict, after the checks both share:
    keys ``weight`` (+ optional ``bias``), a floating ``weight`` of ``rank`` dims (``layout`` names
    them, e.g. "(out, in)"), a tensor input in the weight's dtype (autocast mixes allowed)."""
    check_keys(params, ("weight",), ("bias",), where, "params")
    weight = params["weight"]
    check_floating(weight, where, "weight")
    if weight.dim() != rank:
        raise ValueError(f"{where}: expected {rank}-D weight {layout}, got {shape_str(weight)}")
    check_tensor(x, where)
    return weight, params.get("bias")


def check_rank(x, ranks, where, name="input", layout=""):
    """Raise unless ``x.dim()`` is one of ``ranks``; ``layout`` names the axes, e.g. "(N, C, H, W)"."""
    if x.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        layout = f" {layout}" if layout else ""
        raise ValueError(f"{where}: expected {want} {name}{layout}, got {shape_str(x)}")


def check_keys(d, required, optional, where, what):
    """``d`` is a dict whose keys are all of ``required`` plus any of ``optional``, nothing else."""
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected {what} to be a dict, got {type(d).__name__}")
    keys = set(d)
    missing = [k for k in required if k not in keys]
    unknown = sorted(keys - set(required) - set(optional))
    if missing or unknown:
        allowed = list(required) + [f"{k} (optional)" for k in optional]
        raise ValueError(
            f"{where}: expected {what} with keys {allowed}, got {sorted(keys)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {unknown})" if unknown else ""))


def check_vector(v, length, where, name, context, source):
    """``v`` is a tensor of shape ``(length,)``; the error says it comes from ``context source.shape``.

    The message is only formatted on failure: this runs on every training step.
    """
    check_tensor(v, where, name)
    if v.dim() != 1 or v.shape[0] != length:
        raise ValueError(f"{where}: expected {name} of shape ({length},) ({context} "
                         f"{shape_str(source)}), got {shape_str(v)}")


def is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def pair(v, where, name, minimum):
    """An int or a pair of ints, each ``>= minimum``, as a tuple ``(h, w)``."""
    if is_int(v):
        out = (int(v), int(v))
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(is_int(e) for e in v):
        out = (int(v[0]), int(v[1]))
    else:
        raise TypeError(f"{where}: expected {name} to be an int or a pair of ints, got {v!r}")
    if min(out) < minimum:
        raise ValueError(f"{where}: expected {name} >= {minimum}, got {v!r}")
    return out


def check_bool(v, where, name):
    if not isinstance(v, bool):
        raise TypeError(f"{where}: expected {name} to be a bool, got {v!r}")


def check_positive_int(v, where, name):
    """``v`` is an int ``>= 1`` (not a bool); anything else is a ValueError naming ``name``."""
    if not is_int(v) or v < 1:
        raise ValueError(f"{where}: expected {name} to be a positive int, got {v!r}")
    return int(v)


def check_probability(p, where, name="p", *, below_one=False):
    """``p`` as a float in ``[0, 1]``, or in ``[0, 1)`` with ``below_one=True``.

    ``name`` may carry what the probability is, e.g. ``"dropout (a drop probability)"``.
    """
    interval = "[0, 1)" if below_one else "[0, 1]"
    if not is_real(p):
        raise TypeError(f"{where}: expected {name} to be a float in {interval}, got {p!r}")
    if not (0.0 <= float(p) < 1.0 if below_one else 0.0 <= float(p) <= 1.0):
        raise ValueError(f"{where}: expected {name} in {interval}, got {p!r}")
    return float(p)
