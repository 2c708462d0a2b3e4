"""JAX interop: hand a tree of tensors to JAX and take it back, zero-copy through DLPack.

``to_jax(tree)`` returns the same tree with every tensor leaf replaced by a ``jax.Array`` that
shares its memory; ``from_jax(tree)`` does the reverse. The structure is kept exactly: dicts stay
dicts (same key order), lists lists, tuples tuples, NamedTuples the same NamedTuple class;
Python ``int`` / ``float`` / ``bool`` leaves and ``None`` pass through unchanged. So

    >>> opt_state_jax = to_jax(opt.init(params))        # e.g. to compare with optax
    >>> opt_state = from_jax(opt_state_jax)

round-trips params, state and optimizer state of this project.

jax is an optional dependency (``pip install 'purenn[jax]'``); it is imported when one of these
functions is called, and its absence raises an ImportError that names the extra.

Zero-copy holds for contiguous tensors on a device jax sees (CPU here). The exceptions:

* ``requires_grad`` tensors are detached first (DLPack refuses them); still zero-copy, but the
  jax array is outside autograd.
* non-contiguous tensors (transposes, slices with steps) are first copied into row-major order,
  since jax arrays have no strides.
* a view whose data does not start at an address aligned the way XLA wants (e.g.
  ``x[1:]``) is copied by jax itself.
* ``bool`` tensors go through DLPack where jax supports its bool type (it does from 0.4.20 on
  CPU); otherwise they are copied through numpy.
* with ``jax_enable_x64`` off (jax's default) jax would silently turn float64 / int64 /
  complex128 tensors into 32-bit copies, losing bits (keys are int64, float64 tests are common);
  ``to_jax`` refuses them instead: enable x64 (``jax.config.update("jax_enable_x64", True)``)
  or cast first.

Shared memory cuts both ways: JAX assumes its arrays never change, so do not modify a tensor in
place while a jax array made from it (or a tensor made by ``from_jax``) is in use; ``clone()``
first if you must.
"""

from __future__ import annotations

from typing import Any

import torch

from trees import paths as _tree

_EXTRA = "pip install 'purenn[jax]'"
_WIDE_DTYPES = (torch.float64, torch.int64, torch.complex128, torch.uint64)


def _import_jax(where: str):
    """The ``jax`` module with ``jax.dlpack`` loaded, or an ImportError naming the extra."""
    try:
        import jax
        import jax.dlpack  # noqa: F401  (a submodule: makes jax.dlpack available)
    except ImportError as e:
        raise ImportError(f"{where}: expected jax to be installed (it is an optional "
                          f"dependency of purenn), got ImportError: {e}. Install it with: "
                          f"{_EXTRA}") from e
    return jax


def _x64_enabled(jax) -> bool:
    try:
        return bool(jax.config.read("jax_enable_x64"))
    except (AttributeError, KeyError):  # older jax: the flag is an attribute
        return bool(getattr(jax.config, "jax_enable_x64", False))


def _show(path: str) -> str:
    return repr(path) if path else "the root"


def _scalar_or_none(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float))


def to_jax(tree: Any) -> Any:
    """``tree`` with every ``torch.Tensor`` leaf made a ``jax.Array`` sharing its memory.

    Args:
      tree: a pytree of dicts, lists, tuples and NamedTuples whose leaves are tensors, Python
        ``int`` / ``float`` / ``bool`` or ``None``.

    Returns:
      the same structure (same container types) with ``jax.Array`` leaves of the same shapes and
      dtypes; scalars and ``None`` unchanged. See the module docstring for when a copy is made.

    Raises:
      ImportError: jax is not installed (``pip install 'purenn[jax]'``).
      ValueError: a 64-bit tensor while ``jax_enable_x64`` is off.
      TypeError: a leaf of another type.
    """
    jax = _import_jax("to_jax")
    x64 = _x64_enabled(jax)

    def convert(path: str, x: Any) -> Any:
        if _scalar_or_none(x):
            return x
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"to_jax: expected tensor, int, float, bool or None leaves, got "
                            f"{type(x).__name__} at {_show(path)}")
        if x.dtype in _WIDE_DTYPES and not x64:
            raise ValueError(f"to_jax: got a {x.dtype} tensor at {_show(path)}, but "
                             f"jax_enable_x64 is off, so jax would silently truncate it to 32 "
                             f"bits; expected jax.config.update('jax_enable_x64', True) first, "
                             f"or cast the tensor")
        if x.layout != torch.strided:
            raise TypeError(f"to_jax: expected dense (strided) tensors, got a {x.layout} tensor "
                            f"at {_show(path)}")
        # detach: DLPack refuses tensors that require grad; resolve_*: lazy conj/neg views have
        # no DLPack form; contiguous: jax arrays are row-major (a no-op when already so).
        x = x.detach().resolve_conj().resolve_neg().contiguous()
        try:
            return jax.dlpack.from_dlpack(x)
        except Exception as e:  # jax raises several types; say which leaf and why
            if x.dtype == torch.bool and x.device.type == "cpu":
                return jax.numpy.asarray(x.numpy())  # jax without DLPack bool: copy
            raise RuntimeError(f"to_jax: jax could not import the {x.dtype} tensor on "
                               f"{x.device} at {_show(path)} via DLPack (does jax see that "
                               f"device?): {e}") from e

    return _tree.map_with_path(convert, tree, "to_jax")


def from_jax(tree: Any) -> Any:
    """``tree`` with every ``jax.Array`` leaf made a ``torch.Tensor`` sharing its memory.

    Args:
      tree: a pytree of dicts, lists, tuples and NamedTuples whose leaves are ``jax.Array``,
        Python ``int`` / ``float`` / ``bool`` or ``None`` (e.g. the output of :func:`to_jax`
        after ``jax.tree_util.tree_map``).

    Returns:
      the same structure with tensor leaves of the same shapes and dtypes, on the device that
      held the jax array. Arrays jax stores transposed come back as strided views (no copy).

    Raises:
      ImportError: jax is not installed (``pip install 'purenn[jax]'``).
      TypeError: a leaf of another type, e.g. a numpy array or a traced value inside jax.jit.
    """
    jax = _import_jax("from_jax")

    def convert(path: str, x: Any) -> Any:
        if _scalar_or_none(x):
            return x
        if isinstance(x, jax.core.Tracer):
            raise TypeError(f"from_jax: expected concrete jax.Array leaves, got a traced value "
                            f"({type(x).__name__}) at {_show(path)}; call from_jax outside "
                            f"jax.jit / jax.grad / jax.vmap")
        if not isinstance(x, jax.Array):
            raise TypeError(f"from_jax: expected jax.Array, int, float, bool or None leaves, "
                            f"got {type(x).__name__} at {_show(path)}")
        try:
            return torch.from_dlpack(x)
        except Exception as e:
            if x.dtype == bool:
                return torch.from_numpy(jax.device_get(x).copy())  # torch without DLPack bool
            raise RuntimeError(f"from_jax: torch could not import the {x.dtype} array at "
                               f"{_show(path)} via DLPack: {e}") from e

    return _tree.map_with_path(convert, tree, "from_jax")
