"""Cut a net at a named layer or block, and look its layers up by their torch names.

A net built with :func:`nets.compose.serial` is a tree of layer records whose names are the
``state_dict()`` prefixes of the equivalent ``torch.nn`` module: ``"features"``,
``"features.23"``, ``"classifier.6"``. Its leaves run in order, ``l_1, ..., l_L``
(:func:`nets.leaves`), and ``net.apply`` is their composition. Cutting after ``l_t`` gives two
nets,

    prefix = cut(net, upto=l_t)      l_t o ... o l_1           (l_t included)
    suffix = cut(net, after=l_t)     l_L o ... o l_{t+1}
    net.apply(x) == suffix.apply(prefix.apply(x))             (with the new states merged)

and both keep what makes them parts of ``net`` rather than new nets:

* **names**: parameter and state keys are the whole net's (``"features.0.weight"``), so the
  whole net's ``params`` restricted to a part's keys are that part's parameters;
* **keys**: ``serial`` gives each child one key of ``split(key, n)`` (stax's habit). A part
  keeps that rule (:attr:`nets.compose.Layer.child_keys`) rather than re-splitting over the
  children it kept, so ``part.init(key)`` is exactly the matching subset of ``net.init(key)``
  (without drawing the rest) and ``part.apply(..., train=True, key=key)`` draws the dropout
  masks that ``net.apply(..., key=key)`` draws. Pass a part the key you would pass the net.

A part is an ordinary :class:`~nets.compose.Net`: ``summary``, ``leaves``, ``grad``, ``vmap`` and
``cut`` work on it (``cut(cut(net, after=a), upto=b)`` is the stretch between ``a`` and ``b``).

Structure is read from the records as data, never from their display strings: a layer's
``op`` names the ``torch.nn`` class it mirrors, and :func:`block_ends` lists the
``"MaxPool2d"`` leaves that close the blocks of Models A, B, C and VGG16.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from .compose import Layer, Net, as_net, chain, leaves

__all__ = ["block_ends", "child", "cut", "layer_names", "leaf_keys", "leaf_names", "outputs_at"]


def _layer(net: Union[Net, Layer], where: str) -> Tuple[Layer, str]:
    if isinstance(net, Net):
        return net.layer, net.name
    if isinstance(net, Layer):
        return net, net.kind
    raise TypeError(f"{where}: expected a nets Net or Layer, got {type(net).__name__}")


def _walk(layer: Layer, prefix: str = ""):
    """``(full name, layer)`` of every named layer below ``layer``, parents before children."""
    for name, sub in layer.children:
        full = f"{prefix}.{name}" if prefix else name
        yield full, sub
        yield from _walk(sub, full)


def layer_names(net: Union[Net, Layer]) -> Tuple[str, ...]:
    """Every layer's full name, blocks and leaves, in the order ``apply`` reaches them:
    ``("features", "features.0", ..., "classifier", ..., "classifier.6")``."""
    layer, _ = _layer(net, "layer_names")
    return tuple(name for name, _ in _walk(layer))


def leaf_names(net: Union[Net, Layer], op: Optional[str] = None) -> Tuple[str, ...]:
    """Full names of the leaf layers in the order ``apply`` runs them; with ``op`` (a
    ``torch.nn`` class name such as ``"ReLU"``), only the leaves of that op."""
    layer, _ = _layer(net, "leaf_names")
    return tuple(name for name, leaf in leaves(layer) if op is None or leaf.op == op)


def block_ends(net: Union[Net, Layer]) -> Tuple[str, ...]:
    """Names of the max-pool leaves that close each block, in order.

    Models A, B, C and VGG16 are blocks of convolutions each closed by a 2x2 max-pool (in Models
    B and C a dropout follows it): ``("features.4", "features.9", "features.16", "features.23",
    "features.30")`` for ``vgg16()``. ``cut(net, upto=block_ends(net)[k - 1])`` is the net
    through block ``k``, returning its pooled feature map.
    """
    return leaf_names(net, op="MaxPool2d")


def _unknown(layer: Layer, net_name: str, name, where: str) -> ValueError:
    """The error for a name ``layer`` lacks: the names at the level where the lookup failed."""
    parts = name.split(".") if isinstance(name, str) else []
    found, holder = [], layer
    for part in parts:
        sub = dict(holder.children).get(part)
        if sub is None:
            break
        found.append(part)
        holder = sub
    prefix = ".".join(found)
    here = [f"{prefix}.{n}" if prefix else n for n, _ in holder.children]
    at = f"{prefix!r}" if prefix else net_name
    holds = f"{at} holds {here}" if here else f"{at} is a leaf ({holder.kind})"
    return ValueError(f"{where}: expected the torch name of a layer of {net_name}, got {name!r}; "
                      f"{holds}")


def child(net: Union[Net, Layer], name: str) -> Layer:
    """The layer record named ``name`` (its torch name, e.g. ``"classifier.6"`` or ``"features"``).

    ``child(net, n).init(key)`` gives that layer's parameters under local names (``weight``,
    ``bias``); in the net they are ``f"{n}.weight"``, ... Raises ``ValueError`` naming the
    layers that do exist where the name went wrong.
    """
    layer, net_name = _layer(net, "child")
    found = dict(_walk(layer)).get(name) if isinstance(name, str) else None
    if found is None:
        raise _unknown(layer, net_name, name, "child")
    return found


def leaf_keys(net: Union[Net, Layer], key: Optional[torch.Tensor]) -> Dict[str, Optional[torch.Tensor]]:
    """``{leaf name: key}``: the key each leaf receives from ``net.init(key)`` and from
    ``net.apply(..., train=True, key=key)`` (``None`` everywhere for ``key=None``)."""
    layer, _ = _layer(net, "leaf_keys")

    def walk(layer, key, prefix):
        if not layer.children:
            return {prefix: key}
        keys = layer.child_keys(key) if key is not None else [None] * len(layer.children)
        out = {}
        for (name, sub), k in zip(layer.children, keys):
            out.update(walk(sub, k, f"{prefix}.{name}" if prefix else name))
        return out

    return walk(layer, key, "")


def _pruned(layer: Layer, kept: frozenset, prefix: str = "") -> Optional[Layer]:
    """``layer`` with only the leaves named in ``kept`` (None when none is), each kept child
    given the key it gets in ``layer``."""
    if not layer.children:
        return layer if prefix in kept else None
    children, slots = [], []
    for i, (name, sub) in enumerate(layer.children):
        part = _pruned(sub, kept, f"{prefix}.{name}" if prefix else name)
        if part is not None:
            children.append((name, part))
            slots.append(i)
    if not children:
        return None
    if len(children) == len(layer.children) and all(p is s for (_, p), (_, s) in
                                                    zip(children, layer.children)):
        return layer
    whole_keys = layer.child_keys

    def child_keys(key):
        keys = whole_keys(key)
        return [keys[i] for i in slots]

    return chain(tuple(children), child_keys)


def cut(net: Net, *, upto: Optional[str] = None, after: Optional[str] = None) -> Net:
    """The part of ``net`` up to and including the layer ``upto``, or the part after ``after``.

    ``upto`` / ``after`` is a torch name (:func:`layer_names`): a leaf (``"features.23"``) or a block
    (``"features"``: the cut falls after its last leaf). The part is a :class:`Net` whose
    ``params`` and ``state`` keep the whole net's names, whose ``init(key)`` equals the matching
    subset of ``net.init(key)``, and whose training ``apply(..., key=key)`` draws what
    ``net.apply(..., key=key)`` draws (see the module docstring). Named
    ``f"{net.name}[upto {upto}]"`` or ``f"{net.name}[after {after}]"``.

    Raises ``ValueError`` for an unknown name (listing the names that exist there) or for a cut
    after the last layer (nothing left), ``TypeError`` unless exactly one of ``upto`` and
    ``after`` is given.
    """
    where = "cut"
    if not isinstance(net, Net):
        raise TypeError(f"{where}: expected a nets Net, got {type(net).__name__}")
    if (upto is None) == (after is None):
        raise TypeError(f"{where}: expected exactly one of upto= and after=, got upto={upto!r}, "
                        f"after={after!r}")
    at = upto if after is None else after
    if not isinstance(at, str) or at not in layer_names(net):
        raise _unknown(net.layer, net.name, at, where)
    order = leaf_names(net)
    last = max(i for i, n in enumerate(order) if n == at or n.startswith(at + "."))
    kept = order[:last + 1] if after is None else order[last + 1:]
    if not kept:
        raise ValueError(f"{where}: expected a layer of {net.name} before its last one, got "
                         f"after={after!r}, which leaves nothing")
    part = _pruned(net.layer, frozenset(kept))
    return as_net(part, name=f"{net.name}[upto {upto}]" if after is None else f"{net.name}[after {after}]")


def outputs_at(net: Net, params, state, x: torch.Tensor, names=None) -> list:
    """The eval-mode output of each layer in ``names`` (default :func:`block_ends`: the pooled
    map of every block), from one forward pass cut at each of them, under ``no_grad``.

    ``params`` and ``state`` are the whole net's (each part takes the entries it owns); ``names``
    must be in the order ``apply`` runs them. Returns one tensor per name, e.g.
    ``[(N, C_k, H_k, W_k), ...]`` for the blocks of a VGG-style net.
    """
    where = "outputs_at"
    names = list(block_ends(net) if names is None else names)
    order = leaf_names(net)
    for n in names:
        if n not in layer_names(net):
            raise _unknown(net.layer, net.name, n, where)
    ends = [max(i for i, leaf in enumerate(order) if leaf == n or leaf.startswith(n + "."))
            for n in names]
    if ends != sorted(ends) or len(set(ends)) != len(ends):
        raise ValueError(f"{where}: expected names in the order {net.name} runs them, got {names}")
    outs, rest = [], net
    with torch.no_grad():
        for k, name in enumerate(names):
            part = cut(rest, upto=name)
            x = part.apply({n: params[n] for n in part.layer.param_shapes},
                           {n: state[n] for n in part.layer.state_shapes}, x, train=False)[0]
            outs.append(x)
            if k + 1 < len(names):
                rest = cut(rest, after=name)
    return outs
