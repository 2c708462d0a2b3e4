"""A net as data: small layer records and the ``serial`` combinator, in the spirit of jax stax.

A :class:`Layer` is a record of pure functions plus the facts a summary needs::

    init(key, *, dtype, device) -> (params, state)        flat dicts, local names ("weight", ...)
    apply(params, state, x, *, train, key) -> (y, new_state)
    output_shape(input_shape) -> shape                     shape rule, no tensors involved
    macs(input_shape) -> int                               multiply-adds for the whole input
    param_shapes, state_shapes                             {local name: shape}, known before init
    op                                                     the torch.nn class it mirrors, as data
    children, child_keys                                   a serial's (name, layer) pairs and the
                                                           rule giving each child its key

``serial`` strings layers into a new layer, naming each child by its position (``"0"``, ``"1"``,
...) or by a keyword (``features=..., classifier=...``), and prefixes the children's names with
it, exactly as ``torch.nn.Sequential`` builds ``state_dict()`` keys. One key is split into one
per child (stax's habit), so adding a layer never changes the randomness of the others' order.
:func:`as_net` turns the outer layer into a :class:`Net`:

    init(key, *, dtype=torch.float32, device=None) -> (params, state)
    apply(params, state, x, *, train, key=None) -> (logits, new_state)

``params`` and ``state`` are flat ``{name: tensor}`` dicts keyed like the ``state_dict()`` of the
equivalent ``torch.nn`` module (``"features.0.weight"``, ``"features.1.running_mean"``), so
``torch.func.functional_call(module, {**params, **state}, x)`` is a reference for ``apply``.
Everything is a function of its arguments: it runs under ``torch.func.grad`` (return the new
state through ``has_aux``), ``torch.func.vmap`` and ``torch.compile``.

Example (a small net, see docs/nets.md)::

    body = serial(Conv2d(3, 16, 3, padding=1), BatchNorm2d(16), ReLU(), MaxPool2d(2))
    head = serial(Flatten(), Dropout(0.5), Linear(16 * 16 * 16, 10))
    net = as_net(serial(features=body, classifier=head), name="tiny")
    params, state = net.init(layers.random.key(0))      # keys "features.0.weight", ...
    logits, state = net.apply(params, state, x, train=True, key=layers.random.key(1))
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

import layers
from layers import _checks as C
from layers import random as jr

Shape = Tuple[int, ...]
Tree = Dict[str, Any]
# A weight initialiser: a ``layers.init`` scheme name, or ``f(key, *, dtype, device) -> params``.
Init = Union[str, Callable[..., Tree]]


class Layer(NamedTuple):
    """One layer (or a ``serial`` of them) as data. See the module docstring for each field.

    ``kind`` describes the layer for people (``"MaxPool2d(2x2, stride 2)"``, shown by
    :func:`nets.summary`); ``op`` names what it is for programs: the ``torch.nn`` class it
    mirrors (``"MaxPool2d"``, ``"Sequential"``), so code selects layers by ``op`` and never
    parses ``kind``. ``child_keys(key)`` gives one key per child, the keys ``init`` and
    ``apply`` hand them (``None`` for a leaf); :mod:`nets.cut` replays it.
    """
    kind: str
    init: Callable[..., Tuple[Tree, Tree]]
    apply: Callable[..., Tuple[torch.Tensor, Tree]]
    output_shape: Callable[[Shape], Shape]
    macs: Callable[[Shape], int]
    param_shapes: Mapping[str, Shape]
    state_shapes: Mapping[str, Shape]
    stochastic: bool = False
    children: Tuple[Tuple[str, "Layer"], ...] = ()
    op: str = ""
    child_keys: Optional[Callable[[torch.Tensor], Sequence[torch.Tensor]]] = None


class Net(NamedTuple):
    """A net: ``init(key) -> (params, state)``, ``apply(params, state, x, *, train, key=None)``.

    ``layer`` is the outer :class:`Layer` (for :func:`nets.summary` and :func:`leaves`) and
    ``name`` names the net in error messages.
    """
    init: Callable[..., Tuple[Tree, Tree]]
    apply: Callable[..., Tuple[torch.Tensor, Tree]]
    layer: Layer
    name: str


# --------------------------------------------------------------------------- shape helpers

def _image_shape(shape: Shape, where: str, channels: Optional[int] = None) -> Shape:
    """Check an ``(N, C, H, W)`` shape (with ``C == channels`` when given) and return it."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"{where}: expected a 4-D input shape (N, C, H, W), got {shape}")
    if channels is not None and shape[1] != channels:
        raise ValueError(f"{where}: expected input with {channels} channels, got {shape}")
    return shape


def _window_out(size: int, kernel: int, stride: int, padding: int, dilation: int,
                where: str, axis: str, shape: Shape) -> int:
    """``floor((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1``, torch's rule."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if span < 0:
        raise ValueError(f"{where}: expected padded input {axis} >= dilated kernel {axis} "
                         f"{dilation * (kernel - 1) + 1}, got input {shape}")
    return span // stride + 1


def _check_init(init: Init, where: str) -> None:
    if not callable(init) and init not in layers.init.SCHEMES:
        raise ValueError(f"{where}: expected init to be one of {layers.init.SCHEMES} or a "
                         f"callable, got {init!r}")


def _stateless(op: str, kind: str, fn: Callable[[torch.Tensor], torch.Tensor],
               output_shape: Callable[[Shape], Shape]) -> Layer:
    """A layer without parameters, state or randomness: ``y = fn(x)``."""
    def init(key, *, dtype=torch.float32, device=None):
        return {}, {}

    def apply(params, state, x, *, train, key=None):
        return fn(x), state

    return Layer(kind, init, apply, output_shape, lambda shape: 0, {}, {}, op=op)


# --------------------------------------------------------------------------- leaf layers

def Conv2d(in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=0,
           dilation=1, groups: int = 1, bias: bool = True, init: Init = "torch_default") -> Layer:
    """``torch.nn.Conv2d`` as a record: ``(N, C_in, H, W) -> (N, C_out, Ho, Wo)``.

    ``Ho = floor((H + 2 ph - dh (kh - 1) - 1) / sh) + 1``; multiply-adds
    ``N * C_out * Ho * Wo * (C_in / groups) * kh * kw``. ``init`` is a ``layers.init`` scheme
    name or ``f(key, *, dtype, device) -> {"weight", "bias"}``.
    """
    where = f"Conv2d({in_channels}, {out_channels})"
    C.check_positive_int(in_channels, where, "in_channels")
    C.check_positive_int(out_channels, where, "out_channels")
    C.check_positive_int(groups, where, "groups")
    kh, kw = C.pair(kernel_size, where, "kernel_size", 1)
    sh, sw = C.pair(stride, where, "stride", 1)
    ph, pw = C.pair(padding, where, "padding", 0)
    dh, dw = C.pair(dilation, where, "dilation", 1)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"{where}: expected groups to divide in_channels and out_channels, "
                         f"got groups={groups}")

    _check_init(init, where)

    def init_fn(key, *, dtype=torch.float32, device=None):
        if callable(init):
            return init(key, dtype=dtype, device=device), {}
        return layers.init.conv2d_params(key, in_channels, out_channels, (kh, kw), groups=groups,
                                         bias=bias, scheme=init, dtype=dtype, device=device), {}

    def apply(params, state, x, *, train, key=None):
        y = layers.conv2d(params, x, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
                          groups=groups)
        return y, state

    def output_shape(shape):
        n, _, h, w = _image_shape(shape, where, in_channels)
        return (n, out_channels,
                _window_out(h, kh, sh, ph, dh, where, "height", shape),
                _window_out(w, kw, sw, pw, dw, where, "width", shape))

    def macs(shape):
        n, c, ho, wo = output_shape(shape)
        return n * c * ho * wo * (in_channels // groups) * kh * kw

    param_shapes = {"weight": (out_channels, in_channels // groups, kh, kw)}
    if bias:
        param_shapes["bias"] = (out_channels,)
    kind = (f"Conv2d({in_channels}, {out_channels}, {kh}x{kw}, stride {sh}, pad {ph}"
            f"{'' if bias else ', no bias'})")
    return Layer(kind, init_fn, apply, output_shape, macs, param_shapes, {}, op="Conv2d")


def Linear(in_features: int, out_features: int, *, bias: bool = True,
           init: Init = "torch_default") -> Layer:
    """``torch.nn.Linear`` as a record: ``(N, in) -> (N, out)``, ``N * in * out`` multiply-adds."""
    where = f"Linear({in_features}, {out_features})"
    C.check_positive_int(in_features, where, "in_features")
    C.check_positive_int(out_features, where, "out_features")

    _check_init(init, where)

    def init_fn(key, *, dtype=torch.float32, device=None):
        if callable(init):
            return init(key, dtype=dtype, device=device), {}
        return layers.init.linear_params(key, in_features, out_features, bias=bias,
                                         scheme=init, dtype=dtype, device=device), {}

    def apply(params, state, x, *, train, key=None):
        return layers.linear(params, x), state

    def output_shape(shape):
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or shape[-1] != in_features:
            raise ValueError(f"{where}: expected input with last dimension {in_features}, "
                             f"got {shape}")
        return shape[:-1] + (out_features,)

    def macs(shape):
        return math.prod(output_shape(shape)) * in_features

    param_shapes = {"weight": (out_features, in_features)}
    if bias:
        param_shapes["bias"] = (out_features,)
    return Layer(f"Linear({in_features}, {out_features})", init_fn, apply, output_shape, macs,
                 param_shapes, {}, op="Linear")


def BatchNorm2d(num_features: int, *, momentum: Optional[float] = 0.1, eps: float = 1e-5) -> Layer:
    """``torch.nn.BatchNorm2d`` as a record; shape unchanged.

    Params ``weight`` (1), ``bias`` (0); state ``running_mean`` (0), ``running_var`` (1),
    ``num_batches_tracked`` (0). Counted as one multiply-add per element (the normalisation
    folded into ``y = a x + b`` per channel).
    """
    where = f"BatchNorm2d({num_features})"
    C.check_positive_int(num_features, where, "num_features")

    def init(key, *, dtype=torch.float32, device=None):
        return (layers.init.batch_norm_params(num_features, dtype=dtype, device=device),
                layers.init.batch_norm_state(num_features, dtype=dtype, device=device))

    def apply(params, state, x, *, train, key=None):
        return layers.batch_norm(params, state, x, train=train, momentum=momentum, eps=eps)

    def output_shape(shape):
        return _image_shape(shape, where, num_features)

    return Layer(f"BatchNorm2d({num_features})", init, apply, output_shape,
                 lambda shape: math.prod(output_shape(shape)),
                 {"weight": (num_features,), "bias": (num_features,)},
                 {"running_mean": (num_features,), "running_var": (num_features,),
                  "num_batches_tracked": ()}, op="BatchNorm2d")


def ReLU() -> Layer:
    """``max(x, 0)`` elementwise; shape unchanged."""
    return _stateless("ReLU", "ReLU", layers.relu, lambda shape: tuple(int(s) for s in shape))


def GELU() -> Layer:
    """``torch.nn.GELU()``: ``x Phi(x)`` elementwise (:func:`layers.gelu`); shape unchanged."""
    return _stateless("GELU", "GELU", layers.gelu, lambda shape: tuple(int(s) for s in shape))


def Mul(scale: float) -> Layer:
    """``y = scale * x`` with a fixed ``scale`` (airbench's ``Mul`` module; no torch.nn class,
    no parameters); shape unchanged."""
    if not C.is_real(scale):
        raise TypeError(f"Mul: expected scale to be a real number, got {scale!r}")
    scale = float(scale)
    return _stateless("Mul", f"Mul({scale:g})", lambda x: x * scale,
                      lambda shape: tuple(int(s) for s in shape))


def MaxPool2d(kernel_size, stride=None) -> Layer:
    """``torch.nn.MaxPool2d(kernel_size, stride)``: ``Ho = floor((H - kh) / sh) + 1``."""
    where = f"MaxPool2d({kernel_size})"
    kh, kw = C.pair(kernel_size, where, "kernel_size", 1)
    sh, sw = (kh, kw) if stride is None else C.pair(stride, where, "stride", 1)

    def output_shape(shape):
        n, c, h, w = _image_shape(shape, where)
        return (n, c, _window_out(h, kh, sh, 0, 1, where, "height", shape),
                _window_out(w, kw, sw, 0, 1, where, "width", shape))

    return _stateless("MaxPool2d", f"MaxPool2d({kh}x{kw}, stride {sh})",
                      lambda x: layers.max_pool2d(x, (kh, kw), (sh, sw)), output_shape)


def AdaptiveAvgPool2d(output_size) -> Layer:
    """``torch.nn.AdaptiveAvgPool2d(output_size)``: ``(N, C, H, W) -> (N, C, Ho, Wo)``."""
    where = f"AdaptiveAvgPool2d({output_size})"
    ho, wo = C.pair(output_size, where, "output_size", 1)

    def output_shape(shape):
        n, c, _, _ = _image_shape(shape, where)
        return (n, c, ho, wo)

    return _stateless("AdaptiveAvgPool2d", f"AdaptiveAvgPool2d({ho}x{wo})",
                      lambda x: layers.adaptive_avg_pool2d(x, (ho, wo)), output_shape)


def Flatten() -> Layer:
    """``torch.nn.Flatten()``: ``(N, d1, d2, ...) -> (N, d1 * d2 * ...)``."""
    def output_shape(shape):
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(f"Flatten: expected an input shape with a batch axis and at least "
                             f"one more, got {shape}")
        return (shape[0], math.prod(shape[1:]))

    return _stateless("Flatten", "Flatten", layers.flatten, output_shape)


def Dropout(p: float) -> Layer:
    """``torch.nn.Dropout(p)``: drop with probability ``p`` in training, identity in eval.

    The layer is *stochastic* (needs a key when ``train=True``) exactly when ``p > 0``.
    """
    p = C.check_probability(p, "Dropout", "p (the drop probability)")

    def init(key, *, dtype=torch.float32, device=None):
        return {}, {}

    def apply(params, state, x, *, train, key=None):
        return layers.dropout(x, p=p, train=train, key=key), state

    return Layer(f"Dropout(p={p:g})", init, apply, lambda shape: tuple(int(s) for s in shape),
                 lambda shape: 0, {}, {}, stochastic=p > 0.0, op="Dropout")


# --------------------------------------------------------------------------- combinators

def _prefixed(prefix: str, tree: Mapping[str, Any]) -> Dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in tree.items()}


def serial(*layers_: Layer, **named: Layer) -> Layer:
    """Layers applied one after the other, as ``torch.nn.Sequential``.

    ``serial(a, b, c)`` names the children ``"0"``, ``"1"``, ``"2"``; ``serial(features=a,
    classifier=b)`` names them by keyword (in the order given). A child's parameter ``weight``
    becomes ``"<child name>.weight"`` in the combined dicts. ``init`` splits its key into one key
    per child; so does ``apply`` in training (eval passes no keys).

    Shapes: ``output_shape`` chains the children's rules; ``macs`` sums theirs.
    """
    if layers_ and named:
        raise TypeError("serial: expected layers either all positional or all by keyword, got both")
    children = tuple((str(i), l) for i, l in enumerate(layers_)) or tuple(named.items())
    if not children:
        raise ValueError("serial: expected at least one layer, got none")
    for name, child in children:
        if not isinstance(child, Layer):
            raise TypeError(f"serial: expected layer {name!r} to be a nets.compose.Layer, "
                            f"got {type(child).__name__}")
    n = len(children)
    return chain(children, lambda key: jr.split(key, n))


def chain(children: Tuple[Tuple[str, Layer], ...],
          child_keys: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> Layer:
    """The ``Sequential`` record of :func:`serial`, with the key rule given: child ``i`` gets
    ``child_keys(key)[i]`` in ``init`` and in training ``apply``.

    ``serial`` passes ``split(key, len(children))``; :func:`nets.cut` passes the whole net's
    keys of the children it keeps, so a part of a net draws what the whole net draws.
    """
    # The local names each child reads, computed once so apply only does dict lookups.
    param_names = [(name, tuple(c.param_shapes)) for name, c in children]
    state_names = [(name, tuple(c.state_shapes)) for name, c in children]

    def init(key, *, dtype=torch.float32, device=None):
        jr.check_key(key, "serial.init")
        keys = child_keys(key)
        params, state = {}, {}
        for i, (name, child) in enumerate(children):
            p, s = child.init(keys[i], dtype=dtype, device=device)
            params.update(_prefixed(name, p))
            state.update(_prefixed(name, s))
        return params, state

    def apply(params, state, x, *, train, key=None):
        keys = child_keys(key) if key is not None else None
        new_state = {}
        for i, (name, child) in enumerate(children):
            p = {k: params[f"{name}.{k}"] for k in param_names[i][1]}
            s = {k: state[f"{name}.{k}"] for k in state_names[i][1]}
            x, s = child.apply(p, s, x, train=train, key=None if keys is None else keys[i])
            new_state.update(_prefixed(name, s))
        return x, new_state

    def output_shape(shape):
        for _, child in children:
            shape = child.output_shape(shape)
        return shape

    def macs(shape):
        total = 0
        for _, child in children:
            total += child.macs(shape)
            shape = child.output_shape(shape)
        return total

    param_shapes, state_shapes = {}, {}
    for name, child in children:
        param_shapes.update(_prefixed(name, child.param_shapes))
        state_shapes.update(_prefixed(name, child.state_shapes))
    return Layer("Sequential", init, apply, output_shape, macs, param_shapes, state_shapes,
                 stochastic=any(c.stochastic for _, c in children), children=children,
                 op="Sequential", child_keys=child_keys)


def leaves(layer: Layer, prefix: str = "") -> Tuple[Tuple[str, Layer], ...]:
    """The leaf layers of ``layer`` in the order ``apply`` runs them, with their full names.

    A leaf's parameter ``k`` is ``params[f"{name}.{k}"]`` in the net's dicts.
    """
    if not layer.children:
        return ((prefix, layer),)
    out = []
    for name, child in layer.children:
        out.extend(leaves(child, f"{prefix}.{name}" if prefix else name))
    return tuple(out)


def _check_names(tree, expected: frozenset, where: str, what: str) -> None:
    if not isinstance(tree, dict):
        raise TypeError(f"{where}: expected {what} to be a dict of tensors, got {type(tree).__name__}")
    if tree.keys() != expected:
        missing = sorted(expected - tree.keys())
        unexpected = sorted(tree.keys() - expected)
        raise ValueError(f"{where}: expected {what} with the {len(expected)} keys of init, got "
                         f"{len(tree)} keys (missing {missing}, unexpected {unexpected})")


def as_net(layer: Layer, *, name: str) -> Net:
    """Wrap ``layer`` (usually a ``serial``) as a :class:`Net` with checked inputs.

    ``apply`` checks that ``params`` and ``state`` hold exactly the keys ``init`` makes, that
    ``train`` is a bool, and that a training call of a net with dropout gets a key (equinox's
    habit: no silent fallback). Eval needs no key, and a given key is ignored there.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"as_net: expected a nets.compose.Layer, got {type(layer).__name__}")
    param_names = frozenset(layer.param_shapes)
    state_names = frozenset(layer.state_shapes)
    stochastic = tuple(path for path, leaf in leaves(layer) if leaf.stochastic)

    def init(key, *, dtype=torch.float32, device=None):
        """``(params, state)`` drawn from ``key``; float tensors in ``dtype`` on ``device``
        (default: the key's device)."""
        jr.check_key(key, f"{name}.init")
        if not dtype.is_floating_point:
            raise TypeError(f"{name}.init: expected a floating dtype, got {dtype}")
        params, state = layer.init(key, dtype=dtype,
                                   device=key.device if device is None else device)
        # The summary counts parameters from the declared shapes: hold init to them.
        for what, tree, shapes in (("params", params, layer.param_shapes),
                                   ("state", state, layer.state_shapes)):
            _check_names(tree, frozenset(shapes), f"{name}.init", what)
            wrong = [f"{k}: declared {tuple(shapes[k])}, made {tuple(v.shape)}"
                     for k, v in tree.items() if tuple(v.shape) != tuple(shapes[k])]
            if wrong:
                raise ValueError(f"{name}.init: a layer initialiser made {what} of the wrong "
                                 f"shape: {wrong}")
        return params, state

    def apply(params, state, x, *, train, key=None):
        """``(logits, new_state)``; ``key`` is needed when ``train`` and the net has dropout."""
        where = f"{name}.apply"
        C.check_bool(train, where, "train")
        _check_names(params, param_names, where, "params")
        _check_names(state, state_names, where, "state")
        if not train:
            key = None
        elif key is not None:
            jr.check_key(key, where)
        elif stochastic:
            raise ValueError(f"{where}: expected a random key (layers.random.key) for the dropout "
                             f"layers {list(stochastic)} when train=True, got key=None")
        return layer.apply(params, state, x, train=train, key=key)

    return Net(init, apply, layer, name)
