"""Take any layer's activation, and the loss gradient with respect to it, out of a pure ``apply``.

    out = nets.capture(net, params, state, x, names=["features.2", "classifier"])
    out.logits, out.state, out.activations["features.2"]          # also unpacks as a 3-tuple

    g = nets.capture_grads(net, params, state, x, lambda logits: layers.cross_entropy(logits, y),
                           names=lambda name, layer: layer.op == "ReLU")
    g.loss, g.state, g.activations, g.grads["features.2"]          # d loss / d activation

``names`` are torch module names (:func:`nets.layer_names`: ``"features.2"``, or a block such as
``"classifier"``, whose activation is its output, that of its last leaf, as a torch forward hook
on the ``nn.Sequential`` sees it) or a predicate ``f(name, layer) -> bool`` over every layer
record (select by ``layer.op``, never by the display string ``kind``).

How: the net is cut (:func:`nets.cut`) after each named layer into consecutive parts, and the
parts run one after the other; each named output is kept as it passes. A part keeps the whole
net's names and key rule, so the logits, the new state and (with ``train=True`` and the same
``key``) the dropout masks are those of ``net.apply``, and only the named activations are held.
Everything is a function of its arguments, so ``capture`` runs under ``torch.func.grad``,
``vjp`` and ``vmap``.

Gradients with respect to activations come from *probes*: ``capture(..., probes={name: p})``
adds ``p`` to the named layer's output, so with ``p = 0`` nothing changes and
``d loss / d p = d loss / d activation``. :func:`capture_grads` differentiates with respect to
zero probes; differentiate with respect to ``(params, probes)`` together to get the parameter
gradients in the same backward pass.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from layers import _checks as C
from layers import random as jr

from .compose import Layer, Net, _check_names, leaves
from .cut import child, cut, layer_names, leaf_names

__all__ = ["Capture", "GradCapture", "capture", "capture_grads", "captured_names"]

Names = Union[str, Sequence[str], Callable[[str, Layer], bool]]


class Capture(NamedTuple):
    """What :func:`capture` returns: ``net.apply``'s pair plus ``{name: activation}``."""
    logits: torch.Tensor
    state: Dict[str, torch.Tensor]
    activations: Dict[str, torch.Tensor]


class GradCapture(NamedTuple):
    """What :func:`capture_grads` returns: the loss, the new state, ``{name: activation}`` and
    ``{name: d loss / d activation}`` (each shaped like its activation)."""
    loss: torch.Tensor
    state: Dict[str, torch.Tensor]
    activations: Dict[str, torch.Tensor]
    grads: Dict[str, torch.Tensor]


def _ends(net: Net) -> Dict[str, int]:
    """``{name: index of its last leaf in apply order}`` for every layer name of ``net``."""
    order = {leaf: i for i, leaf in enumerate(leaf_names(net))}
    ends = {}
    for name in reversed(layer_names(net)):        # leaves before the blocks holding them
        ends[name] = order[name] if name in order else max(
            ends[sub] for sub in ends if sub.startswith(name + "."))
    return ends


def captured_names(net: Net, names: Names) -> Tuple[str, ...]:
    """The layer names ``names`` selects, in the order ``apply`` produces them (a block after its
    last leaf), each once.

    ``names``: one torch name, a sequence of them, or a predicate ``f(name, layer) -> bool``
    called on every layer (blocks and leaves). An unknown name raises a ``ValueError`` listing
    the valid ones; so does a predicate that selects nothing.
    """
    return _selected(net, names, "captured_names")


def _selected(net: Net, names: Names, where: str) -> Tuple[str, ...]:
    if not isinstance(net, Net):
        raise TypeError(f"{where}: expected a nets Net, got {type(net).__name__}")
    valid = layer_names(net)
    if callable(names):
        chosen = [n for n in valid if names(n, child(net, n))]
        if not chosen:
            raise ValueError(f"{where}: expected the predicate to select some layer of {net.name}, "
                             f"it selected none; the layers are {list(valid)}")
    else:
        chosen = [names] if isinstance(names, str) else names
        if not isinstance(chosen, (list, tuple)) or not all(isinstance(n, str) for n in chosen):
            raise TypeError(f"{where}: expected names to be a torch layer name, a list of them or "
                            f"a predicate f(name, layer), got {names!r}")
        unknown = [n for n in chosen if n not in valid]
        if unknown:
            raise ValueError(f"{where}: unknown layer names {unknown} for {net.name}; the valid "
                             f"names are {list(valid)}")
    position = {n: i for i, n in enumerate(valid)}
    ends = _ends(net)
    return tuple(sorted(set(chosen), key=lambda n: (ends[n], position[n])))


def _check_call(net: Net, params, state, train, key, where: str) -> None:
    """The checks ``net.apply`` makes, named after this call: the parts only see subsets."""
    C.check_bool(train, where, "train")
    _check_names(params, frozenset(net.layer.param_shapes), where, "params")
    _check_names(state, frozenset(net.layer.state_shapes), where, "state")
    if train and key is not None:
        jr.check_key(key, where)
    elif train:
        stochastic = [name for name, leaf in leaves(net.layer) if leaf.stochastic]
        if stochastic:
            raise ValueError(f"{where}: expected a random key (layers.random.key) for the dropout "
                             f"layers {stochastic} of {net.name} when train=True, got key=None")


def _parts(net: Net, names: Tuple[str, ...]):
    """``[(part, names ending with it)]``, the consecutive cuts of ``net`` after each named layer,
    then ``(rest, ())`` for the leaves after the last one (if any)."""
    ends, order = _ends(net), leaf_names(net)
    stops = sorted({ends[n] for n in names})
    parts, rest = [], net
    for stop in stops:
        leaf = order[stop]
        parts.append((cut(rest, upto=leaf), tuple(n for n in names if ends[n] == stop)))
        rest = cut(rest, after=leaf) if stop < len(order) - 1 else None
    if rest is not None:
        parts.append((rest, ()))
    return parts


def capture(net: Net, params, state, x: torch.Tensor, *, names: Names, train: bool = False,
            key: Optional[torch.Tensor] = None, probes: Optional[Dict[str, torch.Tensor]] = None
            ) -> Capture:
    """``net.apply(params, state, x, train=train, key=key)`` and the output of each named layer.

    Returns ``Capture(logits, state, activations)`` (a NamedTuple: it unpacks as
    ``logits, state, activations``), ``activations = {name: output}`` in apply order. The logits
    and state are ``net.apply``'s (masks included, for the same key); only the named outputs are
    held. ``probes = {name: tensor}`` (names among the selected ones) adds each tensor to that
    layer's output before the rest of the net sees it; with zeros, the gradient with respect to a
    probe is the gradient with respect to the activation (:func:`capture_grads`).

    Raises what ``net.apply`` raises (named ``capture``), and a ``ValueError`` listing the valid
    names for an unknown one.
    """
    where = "capture"
    chosen = _selected(net, names, where)
    _check_call(net, params, state, train, key, where)
    probes = {} if probes is None else probes
    if not isinstance(probes, dict) or not set(probes) <= set(chosen):
        raise ValueError(f"{where}: expected probes as a dict keyed by captured names {list(chosen)}, "
                         f"got {list(probes) if isinstance(probes, dict) else type(probes).__name__}")
    activations, new_state, h = {}, {}, x
    for part, ending in _parts(net, chosen):
        h, s = part.apply({k: params[k] for k in part.layer.param_shapes},
                          {k: state[k] for k in part.layer.state_shapes}, h, train=train, key=key)
        new_state.update(s)
        for name in ending:
            if name in probes:
                h = h + probes[name].to(h.dtype)
        for name in ending:
            activations[name] = h
    return Capture(h, new_state, activations)


def _output_shapes(net: Net, names: Tuple[str, ...], input_shape) -> Dict[str, Tuple[int, ...]]:
    """Each named layer's output shape for ``input_shape``, from the layers' shape rules."""
    shape, after = tuple(input_shape), []
    for _, leaf in leaves(net.layer):
        shape = leaf.output_shape(shape)
        after.append(shape)
    ends = _ends(net)
    return {n: after[ends[n]] for n in names}


def capture_grads(net: Net, params, state, x: torch.Tensor,
                  loss: Callable[[torch.Tensor], torch.Tensor], *, names: Names,
                  train: bool = False, key: Optional[torch.Tensor] = None) -> GradCapture:
    """The loss, the named activations and ``d loss / d activation`` for each named layer.

    ``loss(logits) -> scalar`` (close over the targets: ``lambda z: layers.cross_entropy(z, y)``).
    Zero probes, shaped by the layers' shape rules, are added to the named outputs
    (:func:`capture`) and ``torch.func.grad_and_value`` differentiates the loss with respect to
    them; the forward pass is ``net.apply``'s, so in training the gradients are those of the
    step that ``net.apply`` with this ``key`` would take. ``grads[name]`` is what a
    ``torch.nn`` full backward hook on that module receives as ``grad_output``. Runs under
    ``torch.func.vmap`` (per-sample activation gradients) and inside other transforms.

    Returns ``GradCapture(loss, state, activations, grads)``.
    """
    where = "capture_grads"
    chosen = _selected(net, names, where)
    C.check_tensor(x, where)
    if not callable(loss):
        raise TypeError(f"{where}: expected loss to be a function of the logits, got {loss!r}")
    shapes = _output_shapes(net, chosen, x.shape)
    probes = {n: torch.zeros(shapes[n], dtype=x.dtype, device=x.device) for n in chosen}

    def run(probes):
        out = capture(net, params, state, x, names=chosen, train=train, key=key, probes=probes)
        value = loss(out.logits)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            shape = C.shape_str(value) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{where}: expected loss(logits) to return a scalar tensor, got {shape}")
        return value, (out.state, out.activations)

    grads, (value, (new_state, activations)) = torch.func.grad_and_value(run, has_aux=True)(probes)
    return GradCapture(value, new_state, activations, grads)
