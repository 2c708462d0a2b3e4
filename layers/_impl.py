"""The formulation switch: which of a layer's two formulations runs when a call does not say.

Every layer function takes ``impl=None | "fast" | "explicit"``:

* ``"fast"`` (the default) is a thin wrapper around the fused torch primitive
  (``torch.nn.functional`` / ``torch`` ops): shape validation, then one call.
* ``"explicit"`` writes the math out (im2col + matmul for convolution, a max over gathered
  windows for pooling, mean/variance for batch norm, ...) for people who step through it, and
  its backward pass too: each is a ``torch.autograd.Function`` (``Explicit*``, see
  :mod:`layers._autograd`) whose ``backward`` is the derivation in its docstring.

``impl=None`` means "the current default", which is the only piece of global state in
``layers``. It is read at call time, so it can be changed globally with
:func:`set_default_impl` or for a block with the :func:`default_impl` context manager::

    with layers.default_impl("explicit"):
        y = layers.conv2d(params, x)        # explicit formulation
"""
import contextlib

IMPLS = ("fast", "explicit")

_default = "fast"


def _check_name(name, where):
    if not isinstance(name, str) or name not in IMPLS:
        raise ValueError(f"{where}: expected impl to be one of {IMPLS}, got {name!r}")


def set_default_impl(name):
    """Set the formulation used by every layer call that passes ``impl=None``."""
    global _default
    _check_name(name, "set_default_impl")
    _default = name


def get_default_impl():
    """The formulation used by every layer call that passes ``impl=None``."""
    return _default


@contextlib.contextmanager
def default_impl(name):
    """Use formulation ``name`` as the default inside a ``with`` block; restore it on exit."""
    _check_name(name, "default_impl")
    previous = get_default_impl()
    set_default_impl(name)
    try:
        yield name
    finally:
        set_default_impl(previous)


def resolve(impl, where):
    """The formulation a call runs: ``impl`` itself, or the default when ``impl`` is None."""
    if impl is None:
        return _default
    _check_name(impl, where)
    return impl
