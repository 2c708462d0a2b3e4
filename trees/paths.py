"""Tree paths: the one name every package gives to a leaf of a pytree.

Checkpoints (``nets.save`` / ``nets.load``), the JAX bridge and optim's error messages, masks and
path-keyed sub-trees all name leaves the same way. The trees of docs/architecture.md (params,
state, optimizer state, keys, step counters) are built from four containers: ``dict`` (and its
subclasses, e.g. ``OrderedDict``), ``list``, ``tuple`` and ``NamedTuple``. Everything else,
``None`` included, is a *leaf*.

A leaf's *path* is the keys from the root down to it joined by ``"/"``:

* dict entries by key (``"features.0.weight"``: the dots belong to the key),
* list and tuple entries by position (``"0"``, ``"1"``, ...),
* NamedTuple entries by field name (``"mu"``, ``"count"``),

so ``(params, state, opt_state)`` with ``opt_state = (ScaleByAdamState(count, lr, mu, nu,
nu_max),)`` names a leaf ``"2/0/mu/features.0.weight"``; the root itself, when it is a leaf, has
path ``""``. Dict keys must be strings without ``"/"``, which makes the path of every leaf unique.

Two walks produce these names: :func:`leaves_with_paths` / :func:`map_with_path` walk the four
containers themselves (checkpoints and the JAX bridge, which check the keys), and
:func:`path_of` / :func:`leaf_paths` name the key paths of ``torch.utils._pytree`` (optim, which
flattens with pytree as ``torch.func`` does). Both join with :func:`join`.

Imports: torch and the standard library only (``optim`` and ``nets`` both use this package).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

from torch.utils import _pytree as pytree

SEP = "/"


def is_namedtuple(x: Any) -> bool:
    """True for instances of ``typing.NamedTuple`` / ``collections.namedtuple`` classes."""
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def is_container(x: Any) -> bool:
    """True for the container nodes of a tree: dict, list, tuple (NamedTuple included)."""
    return isinstance(x, (dict, list, tuple))


def join(prefix: str, key: str) -> str:
    """``join("params", "fc.weight") == "params/fc.weight"``; ``join("", "0") == "0"``."""
    return key if prefix == "" else prefix + SEP + key


def check_dict_key(key: Any, prefix: str, where: str) -> str:
    """Return ``key`` if it can name a tree entry; raise naming the dict that holds it."""
    at = f"dict at {prefix!r}" if prefix else "the root dict"
    if not isinstance(key, str):
        raise TypeError(f"{where}: expected str keys in {at}, got key {key!r} of type "
                        f"{type(key).__name__}")
    if SEP in key:
        raise ValueError(f"{where}: expected keys without {SEP!r} in {at} (it separates the "
                         f"parts of a tree path), got key {key!r}")
    return key


def children(node: Any, prefix: str, where: str) -> list[tuple[str, Any]]:
    """The ``(path, child)`` pairs of a container node, in its own order."""
    if isinstance(node, dict):
        return [(join(prefix, check_dict_key(k, prefix, where)), v) for k, v in node.items()]
    if is_namedtuple(node):
        return [(join(prefix, f), v) for f, v in zip(type(node)._fields, node)]
    return [(join(prefix, str(i)), v) for i, v in enumerate(node)]


def leaves_with_paths(tree: Any, where: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(path, leaf)`` of ``tree`` depth first, in container order (``None`` is a leaf)."""
    if not is_container(tree):
        yield prefix, tree
        return
    for path, child in children(tree, prefix, where):
        yield from leaves_with_paths(child, where, path)


def rebuild(template: Any, values: list[Any]) -> Any:
    """A container of ``template``'s type holding ``values`` in place of its children.

    ``values`` are in the order of :func:`children`. Dict subclasses are shallow-copied and
    refilled so that their extra state (an ``OrderedDict``'s class, a ``defaultdict``'s
    factory) survives; NamedTuples are rebuilt field by field.
    """
    if isinstance(template, dict):
        items = zip(template.keys(), values)
        if type(template) is dict:
            return dict(items)
        out = copy.copy(template)
        out.clear()
        out.update(items)
        return out
    if is_namedtuple(template):
        return type(template)(*values)
    return type(template)(values)  # list, tuple and their subclasses (torch.Size)


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, where: str,
                  prefix: str = "") -> Any:
    """``tree`` with every leaf ``x`` at path ``p`` replaced by ``fn(p, x)``, containers kept."""
    if not is_container(tree):
        return fn(prefix, tree)
    return rebuild(tree, [map_with_path(fn, child, where, path)
                          for path, child in children(tree, prefix, where)])


def key_name(entry: Any) -> str:
    """The path part of one ``torch.utils._pytree`` key entry: a dict key (``MappingKey``), a
    position (``SequenceKey``) or a NamedTuple field (``GetAttrKey``), as a string."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_of(key_path: tuple) -> str:
    """``(MappingKey('features'), SequenceKey(0), MappingKey('bias'))`` -> ``'features/0/bias'``;
    the empty key path (the root) -> ``''``. No key is checked: optim's path-keyed sub-dicts
    hold keys that are themselves paths."""
    path = ""
    for entry in key_path:
        path = join(path, key_name(entry))
    return path


def leaf_paths(tree: Any) -> list[str]:
    """The paths of ``tree``'s leaves in ``torch.utils._pytree`` flatten order."""
    return [path_of(p) for p, _ in pytree.tree_flatten_with_path(tree)[0]]


def is_within(path: str, prefix: str) -> bool:
    """True when ``path`` lies strictly below ``prefix`` (every path lies below the root ``''``)."""
    return prefix == "" or path.startswith(prefix + SEP)


def show(path: str) -> str:
    """A path for an error message: ``'features.0.weight'`` quoted, or ``the root``."""
    return repr(path) if path else "the root"
