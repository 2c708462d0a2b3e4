"""A net's ``apply`` as a pure JAX function, through torchax: jit it, differentiate it, train it
with optax.

    jax.config.update("jax_enable_x64", True)             # keys and step counts are int64
    apply = nets.jax_apply(net)
    params, state = nets.to_jax(net.init(layers.random.key(0)))
    step = jax.jit(apply, static_argnames="train")
    logits, state = step(params, state, x, train=True, key=nets.to_jax(layers.random.key(1)))

``apply(params, state, x, *, train, key=None) -> (logits, new_state)`` takes and returns trees of
``jax.Array`` (tracers inside ``jax.jit`` / ``jax.grad`` / ``jax.vmap``), with the structure and
meaning of ``net.apply``'s torch trees: the same keys give the same dropout masks (the key hash
runs as integer ops inside the JAX program), and the same batch-norm running statistics.

How: torchax (an optional extra, ``pip install 'purenn[torchax]'``) wraps each array in a torch
tensor subclass whose every aten operation is lowered to ``jax.numpy``; ``net.apply`` runs
unchanged on them, so the torch code *is* the JAX program. Two repairs make that exact here:

* **Batch norm's running statistics.** torchax 0.0.13 lowers ``aten.native_batch_norm`` without
  writing the running statistics back (``F.batch_norm`` updates them in place, and the fast
  formulation relies on that), so they silently stay at their initial values. This module runs
  nets in its own torchax environment in which that operation is replaced by torch's formula with
  an explicit in-place update of the running mean and the unbiased running variance. The
  explicit formulation (``impl="explicit"``) is correct without the repair, but about 3x slower.
* **torchax on newer torch** (the compatibility shim). torchax 0.0.13 names at import time aten
  operations that torch 2.14 no longer has (``aten.prod.dim_Dimname``, ``aten.cholesky``, ...), so
  ``import torchax`` fails. While torchax is imported and its operation table built, a lookup of a
  missing ``aten`` operation *made by torchax's own modules* returns a placeholder that nothing
  dispatches to; every other lookup, torch's own included, behaves as usual. :func:`missing_ops`
  lists the names that needed it; tests/test_jax_apply.py fails once none does (then delete the
  shim).

Limits: x64 must be on (keys are int64); every tensor the net uses must come in through the
arguments (a torch tensor captured in a closure is not a torchax tensor); purenn's optimizers do not
run under torchax (no lowering of ``_foreach_*``; ``int(count)`` needs a concrete value), so train
with optax. Importing torchax renames torch's ``privateuse1`` backend to ``"jax"`` for the
process. See docs/jax.md.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable

import torch

from trees import paths as _tree

from .jax_interop import _import_jax, _show, _x64_enabled

_EXTRA = "pip install 'purenn[torchax]'"
_MISSING: list[str] = []


class _MissingOp:
    """Stands in for an aten operation or overload this torch lacks; never dispatched to."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<aten operation missing in torch {torch.__version__}: {self.name}>"

    def __getattr__(self, overload: str):
        if overload.startswith("__"):
            raise AttributeError(overload)
        return _MissingOp(f"{self.name}.{overload}")

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self.name} does not exist in torch {torch.__version__}")


def _asked_by_torchax(depth: int = 2) -> bool:
    caller = sys._getframe(depth).f_globals.get("__name__", "")
    return caller == "torchax" or caller.startswith("torchax.")


@contextlib.contextmanager
def _stand_in_for_missing_aten_ops():
    """While active, ``torch.ops.aten.<missing>`` and ``<packet>.<missing overload>`` evaluated
    in torchax's modules give a :class:`_MissingOp` (recorded in ``_MISSING``) instead of raising."""
    ops = torch._ops
    namespace_getattr, packet_getattr = ops._OpNamespace.__getattr__, ops.OpOverloadPacket.__getattr__

    def namespace_lookup(self, name):
        try:
            return namespace_getattr(self, name)
        except AttributeError:
            if self.name != "aten" or name.startswith("__") or not _asked_by_torchax():
                raise
            _MISSING.append(f"aten::{name}")
            return _MissingOp(f"aten::{name}")

    def packet_lookup(self, name):
        try:
            return packet_getattr(self, name)
        except AttributeError:
            if (not self._qualified_op_name.startswith("aten::") or name.startswith("__")
                    or not _asked_by_torchax()):
                raise
            _MISSING.append(f"{self._qualified_op_name}.{name}")
            return _MissingOp(f"{self._qualified_op_name}.{name}")

    ops._OpNamespace.__getattr__, ops.OpOverloadPacket.__getattr__ = namespace_lookup, packet_lookup
    try:
        yield
    finally:
        ops._OpNamespace.__getattr__, ops.OpOverloadPacket.__getattr__ = namespace_getattr, packet_getattr


def missing_ops() -> tuple[str, ...]:
    """The aten operations torchax named that this torch lacks (the shim stood in for them);
    empty when torchax imports cleanly. Imports torchax."""
    _environment()
    return tuple(dict.fromkeys(_MISSING))


def _import_torchax(where: str):
    """``(jax, torchax)``, importing torchax through the shim, or an ImportError naming the extra."""
    try:
        jax = _import_jax(where)
        with _stand_in_for_missing_aten_ops():
            import torchax
            import torchax.tensor  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{where}: expected jax and torchax to be installed (optional "
                          f"dependencies of purenn), got ImportError: {e}. Install them with: "
                          f"{_EXTRA}") from e
    return jax, torchax


def _batch_norm_with_running_update(input, weight, bias, running_mean, running_var, training,
                                    momentum, eps):
    """``aten.native_batch_norm`` as torch computes it, running statistics updated in place:
    ``r <- (1 - momentum) r + momentum * batch`` with the batch's unbiased variance. Computed in
    the dtype of the parameters / statistics (float32 for a bfloat16 input, as torch)."""
    like = next((t for t in (weight, running_mean) if t is not None), input)
    x = input.to(like.dtype)
    axes = [0] + list(range(2, x.dim()))
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    if training or running_mean is None:
        mean = x.mean(dim=axes)
        var = ((x - mean.reshape(per_channel)) ** 2).mean(dim=axes)       # biased, to normalise
        if training and running_mean is not None:
            n = x.numel() // x.shape[1]
            running_mean.copy_((1 - momentum) * running_mean + momentum * mean.detach())
            running_var.copy_((1 - momentum) * running_var + momentum * (var * (n / (n - 1))).detach())
    else:
        mean, var = running_mean, running_var
    invstd = torch.rsqrt(var + eps)
    y = (x - mean.reshape(per_channel)) * invstd.reshape(per_channel)
    if weight is not None:
        y = y * weight.reshape(per_channel)
    if bias is not None:
        y = y + bias.reshape(per_channel)
    return y.to(input.dtype), mean, invstd


#: The operations whose torchax lowering drops the running statistics (see the module docstring).
BATCH_NORM_OPS = ("native_batch_norm.default", "_native_batch_norm_legit.default")


def _aten(name: str):
    packet, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, packet), overload)


@functools.lru_cache(maxsize=None)
def _environment():
    """purenn's own torchax environment (torchax.default_env() is left as torchax made it), with
    batch norm's running update made explicit."""
    _, torchax = _import_torchax("jax_apply")
    with _stand_in_for_missing_aten_ops():
        env = torchax.tensor.Environment()        # builds the op table: imports torchax.ops
    for name in BATCH_NORM_OPS:
        env.override_op_definition(_aten(name), _batch_norm_with_running_update)
    return env


def jax_apply(net, *, impl: str | None = None) -> Callable[..., Any]:
    """``net.apply`` as a pure JAX function of ``jax.Array`` trees (see the module docstring).

    Args:
      net: a :class:`nets.Net` (``nets.model_b()``, ...).
      impl: the layers' formulation while the function is traced (``"fast"``, ``"explicit"``), or
        None for ``layers``' default at trace time.

    Returns:
      ``apply(params, state, x, *, train, key=None) -> (logits, new_state)``; under ``jax.jit``
      mark ``train`` static (``static_argnames="train"``).

    Raises:
      ImportError: jax or torchax is not installed (``pip install 'purenn[torchax]'``).
    """
    jax, _ = _import_torchax("jax_apply")
    import layers
    from torchax.tensor import Tensor
    env = _environment()
    name = getattr(net, "name", "net")

    def to_torch(path, x):
        if isinstance(x, jax.Array):
            return Tensor(x, env)
        if x is None or isinstance(x, (bool, int, float)):
            return x
        raise TypeError(f"jax_apply({name}): expected jax.Array, int, float, bool or None leaves, "
                        f"got {type(x).__name__} at {_show(path)}; convert torch trees with "
                        f"nets.to_jax")

    def to_jax(path, x):
        return x.jax() if isinstance(x, Tensor) else x

    def apply(params, state, x, *, train, key=None):
        if not _x64_enabled(jax):
            raise ValueError(f"jax_apply({name}): expected jax_enable_x64 on (random keys and "
                             f"batch-norm step counts are int64), got it off: call "
                             f"jax.config.update('jax_enable_x64', True) first")
        args = _tree.map_with_path(to_torch, {"params": params, "state": state, "x": x, "key": key},
                                   "jax_apply")
        formulation = layers.default_impl(impl) if impl is not None else contextlib.nullcontext()
        with formulation, env:
            out = net.apply(args["params"], args["state"], args["x"], train=train, key=args["key"])
        return _tree.map_with_path(to_jax, out, "jax_apply")

    return apply
