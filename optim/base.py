"""The optimizer contract: ``GradientTransformation(init, update)``, ``apply_updates`` and ``step``.

An optimizer is a pair of pure functions over pytrees (nested dicts / tuples / NamedTuples whose
leaves are tensors, walked with ``torch.utils._pytree`` like ``torch.func`` does):

    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = apply_updates(params, updates)          # params + updates, leaf by leaf

No argument is ever mutated and ``update`` is a function of its arguments only, so calling it
twice on the same arguments gives the same result. Returned trees may share storage with each
other (e.g. SGD's updates and its momentum buffer), so treat every tree as immutable.

``step(opt, grads, state, params) -> (params, state)`` is the same computation as
``update`` followed by ``apply_updates`` but lets the last transformation write the new
parameters in the very foreach call that applies the learning rate (``fused_step``), the way
``torch.optim``'s foreach path updates parameters: one pass over memory less, and the same
floating-point operations as torch.

``step(..., donate=True)`` is the one exception to "nothing is mutated", and it is explicit, as
``jax.jit(..., donate_argnums=...)``: the caller hands ``params`` and ``state`` over, and the new
values are written into their storage with torch.optim's in-place foreach operations. Results are
bit-identical to ``donate=False``; the donated trees must not be used afterwards.

**Which path training runs.** The trainer calls ``step(opt, grads, state, params, donate=...)``:
for a chain that is ``donated_update`` (donating) or ``update`` (pure) of every stage but the
last, then the last stage's ``fused_step``. ``update`` is what a reader studies, and it is the
same math: each stage writes its arithmetic once, in one *kernel* ``kernel(updates, state,
params, mode) -> (out, new_state, out_owned)``, and its ``update``, ``donated_update`` and
``fused_step`` are the thin wrappers :func:`transformation` makes, differing only in the
:class:`Mode` they pass (write in place or not; return updates or new parameters).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch.utils import _pytree as pytree

from trees import is_within, leaf_paths, path_of, show

Tree = Any
InitFn = Callable[[Tree], Tree]
UpdateFn = Callable[..., "tuple[Tree, Tree]"]
FusedStepFn = Callable[..., "tuple[Tree, Tree]"]
DonatedUpdateFn = Callable[..., "tuple[Tree, Tree, bool]"]


class GradientTransformation(NamedTuple):
    """An optimizer or one stage of one, as pure functions.

    init(params) -> state
    update(updates, state, params=None) -> (new_updates, new_state)
    fused_step(updates, state, params, donate) -> (new_params, new_state), or None when the stage
        has no fused form; ``optim.step`` then runs ``update`` and ``apply_updates``. With
        ``donate`` True it may write the results into the storage of ``params`` and ``state``
        (and returns those tensors); with False it mutates nothing.
    donated_update(updates, state, params, updates_owned) -> (new_updates, new_state,
        new_updates_owned), or None: ``update`` with ``state`` donated (the new state may be
        written into its storage). ``updates_owned`` says the incoming updates are temporaries
        of this step that nothing else references, so they may be overwritten too; the stage
        returns whether its own ``new_updates`` are such temporaries (False when they are, or
        share storage with, the caller's gradients or the state). ``step(..., donate=True)``
        uses it for every stage of a chain but the last; a stage without it runs ``update``.

    Only ``init`` and ``update`` are needed; the other two are optional speed-ups that must give
    bit-identical results.
    """

    init: InitFn
    update: UpdateFn
    fused_step: FusedStepFn | None = None
    donated_update: DonatedUpdateFn | None = None


class EmptyState(NamedTuple):
    """State of a stateless transformation (no leaves)."""


def no_state(params: Tree) -> EmptyState:
    """``init`` of a stateless transformation."""
    return EmptyState()


def _first_difference(a_name: str, a: Tree, b_name: str, b: Tree) -> str:
    a_paths, b_paths = leaf_paths(a), leaf_paths(b)
    a_set, b_set = set(a_paths), set(b_paths)
    for p in b_paths:
        if p not in a_set:
            if any(is_within(q, p) for q in a_paths):
                return f"{show(p)}: a leaf in {b_name} but a subtree in {a_name}"
            return f"{show(p)}: missing in {a_name}"
    for p in a_paths:
        if p not in b_set:
            return f"{show(p)}: unexpected in {a_name} (not in {b_name})"
    # Same leaf paths, different containers (e.g. a list against a tuple) or key order.
    _, a_spec = pytree.tree_flatten(a)
    _, b_spec = pytree.tree_flatten(b)
    return f"{show('')}: containers differ ({a_name} {a_spec}, {b_name} {b_spec})"


def flatten_like(fn: str, a_name: str, a: Tree, b_name: str, b: Tree):
    """Flatten ``a`` and ``b`` once, checking they have the same structure, shapes and dtypes.

    Returns ``(a_leaves, b_leaves, spec)``. Raises ValueError naming the first differing path,
    e.g. ``update: grads and params differ at 'features.0.bias': missing in grads`` (paths as
    :mod:`trees.paths` writes them: ``'features/0/bias'`` for nested dicts).
    """
    a_leaves, a_spec = pytree.tree_flatten(a)
    b_leaves, b_spec = pytree.tree_flatten(b)
    if a_spec != b_spec:
        raise ValueError(
            f"{fn}: {a_name} and {b_name} differ at {_first_difference(a_name, a, b_name, b)}")
    for i, (x, y) in enumerate(zip(a_leaves, b_leaves)):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            bad, name = (x, a_name) if not isinstance(x, torch.Tensor) else (y, b_name)
            raise TypeError(f"{fn}: expected tensor leaves, got {type(bad).__name__} in {name} "
                            f"at {show(leaf_paths(a)[i])}")
        if x.shape != y.shape or x.dtype != y.dtype:
            raise ValueError(
                f"{fn}: {a_name} and {b_name} differ at {show(leaf_paths(a)[i])}: expected "
                f"{tuple(y.shape)} {y.dtype} as in {b_name}, got {tuple(x.shape)} {x.dtype}")
    return a_leaves, b_leaves, a_spec


def tensor_leaves(fn: str, name: str, tree: Tree):
    """Flatten ``tree``, checking every leaf is a tensor. Returns ``(leaves, spec)``."""
    leaves, spec = pytree.tree_flatten(tree)
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: expected tensor leaves, got {type(x).__name__} in {name} "
                            f"at {show(leaf_paths(tree)[i])}")
    return leaves, spec


def count_tensor(n=0) -> torch.Tensor:
    """A step counter as a 0-d int64 tensor (saveable like any other state leaf); a tensor
    ``n`` (a count computed on the device, under ``vmap``) is returned as int64 without a host
    read."""
    if isinstance(n, torch.Tensor):
        return n.to(torch.int64)
    return torch.tensor(n, dtype=torch.int64)


def rate_tensor(rate) -> torch.Tensor:
    """A learning rate as a 0-d float64 tensor (the ``lr`` field of a state, as torch's
    ``param_groups[0]["lr"]`` holds it); a tensor rate is converted without a host read."""
    if isinstance(rate, torch.Tensor):
        return rate.to(torch.float64)
    return torch.tensor(float(rate), dtype=torch.float64)


def step_count(count: torch.Tensor, *hypers, device=None):
    """The number of updates done, ``count``, as a Python int where it can be read on the host
    (the scalar path: bit-identical to torch.optim's), else the tensor itself, moved to
    ``device`` when one is given: under a torch.func transform, or when a hyperparameter is a
    tensor (the tensor path, which never reads a value on the host). ``device`` is the
    updates' device: ``init`` makes the counter on the CPU, and under ``vmap`` the members'
    counters are no longer a CPU scalar that a GPU kernel accepts. The state's next counter
    is ``state.count + 1``, on the host as before (no copy back)."""
    if is_traced(count) or any(is_tensor_hyper(h) for h in hypers):
        return count if device is None else count.to(device)
    return int(count)


class Mode(NamedTuple):
    """How a stage's kernel runs: which entry point called it, so what it may write and return.

    donate: ``state`` (and, with ``new_params``, ``params``) is donated: write the new values into
        its storage with torch.optim's in-place foreach ops.
    updates_owned: the incoming updates are temporaries of this step: they may be overwritten.
    new_params: return the new parameters (the fused step) instead of the updates.

    ``update`` runs ``Mode()``, ``donated_update`` ``Mode(donate=True, updates_owned=...)`` and
    ``fused_step`` ``Mode(donate=..., new_params=True)``.
    """
    donate: bool = False
    updates_owned: bool = False
    new_params: bool = False

    def name(self, stage: str) -> str:
        """``'<stage>.step'`` or ``'<stage>.update'``, for error messages."""
        return f"{stage}.step" if self.new_params else f"{stage}.update"


def is_traced(x) -> bool:
    """True for a tensor wrapped by a torch.func transform (``vmap``, ``grad``, ...): its value
    cannot be read on the host (no ``int(x)``, no ``float(x)``) and foreach ops have no batching
    rule for it.

    Under ``torch.compile`` every tensor is a traced value (a host read would break the graph),
    so every tensor answers True there: the step takes its tensor path, which is bit-identical
    to the host path (docs/optim.md), and dynamo never meets the functorch introspection."""
    if torch.compiler.is_compiling():
        return isinstance(x, torch.Tensor)
    return isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)


def is_tensor_hyper(x) -> bool:
    """True for a hyperparameter given as a tensor (a learning rate, momentum, beta or weight
    decay per ensemble member under ``vmap``, as optax's ``inject_hyperparams``)."""
    return isinstance(x, torch.Tensor)


def _leaf_op(op: str, t: torch.Tensor, args: tuple, kwargs: dict, in_place: bool) -> torch.Tensor:
    """One leaf of ``foreach``: ``torch.<op>`` (or the in-place method).

    A 0-d tensor scalar (a tensor hyperparameter, a float64 bias correction) is cast to the leaf's
    dtype first, as torch casts a Python scalar to the op's compute type: the same value, the
    same bits. A tensor ``alpha`` of ``add`` becomes ``addcmul(t, other, alpha)`` (one rounding,
    as ``add``'s scalar alpha: the same bits); a tensor ``value`` of ``addcdiv`` becomes
    ``addcdiv(t, value * a, b)`` and of ``addcmul`` ``addcmul(t, value * a, b)`` (torch's own
    order of operations: the same bits as the Python number, checked in tests/test_optim_tensor_hyperparams.py).
    """
    def cast(x):
        if isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype != t.dtype and t.is_floating_point():
            return x.to(t.dtype)
        return x

    if op == "addcdiv" and len(args) == 3:   # torch's per-leaf scalar list entry
        args, kwargs = args[:2], dict(kwargs, value=args[2])
    args = tuple(cast(a) for a in args)
    kwargs = {k: cast(v) for k, v in kwargs.items()}
    if is_traced(t) or any(is_traced(a) for a in (*args, *kwargs.values())):
        in_place = False   # under vmap nothing is donated, and out-of-place ops have batching rules
    alpha, value = kwargs.get("alpha"), kwargs.get("value")
    if op == "add" and isinstance(alpha, torch.Tensor):
        return t.addcmul_(args[0], alpha) if in_place else torch.addcmul(t, args[0], alpha)
    if op == "addcdiv" and isinstance(value, torch.Tensor):
        # torch's CPU kernel computes t + (value * a) / b: the same with value folded into a
        a, b = args
        return t.addcdiv_(value * a, b) if in_place else torch.addcdiv(t, value * a, b)
    if op == "addcmul" and isinstance(value, torch.Tensor):
        # torch's CPU kernel computes t + (value * a) * b: the same with value folded into a
        a, b = args
        return t.addcmul_(value * a, b) if in_place else torch.addcmul(t, value * a, b)
    if in_place and hasattr(t, f"{op}_"):
        return getattr(t, f"{op}_")(*args, **kwargs)
    if in_place:   # e.g. maximum, which has no in-place method
        return getattr(torch, op)(t, *args, out=t, **kwargs)
    return getattr(torch, op)(t, *args, **kwargs)


def foreach(op: str, tensors: list, *args, in_place: bool, leafwise: bool = False,
            **kwargs) -> list:
    """``torch._foreach_<op>(tensors, *args, **kwargs)``: new tensors, or, when ``in_place``,
    written into ``tensors`` by ``torch._foreach_<op>_`` (and ``tensors`` returned). The same
    arithmetic either way, which keeps the pure and the donated step bit-identical. ``[]`` for
    an empty list (torch's foreach ops refuse one).

    Leaf by leaf instead (the same ops one tensor at a time, which is what torch's foreach does on
    the CPU) when ``leafwise`` (the tensor path: a per-leaf scalar list of tensors), when a tensor
    is wrapped by a torch.func transform (foreach ops have no vmap rule) or when a scalar argument
    is a tensor hyperparameter. An argument that is a list (another tensor list, or torch's
    per-leaf scalar list) is taken element by element.
    """
    if not tensors:
        return []
    scalars = list(args) + list(kwargs.values())
    per_leaf = (leafwise or any(is_traced(t) for t in tensors)
                or any(isinstance(a, torch.Tensor) for a in scalars)
                or any(isinstance(a, list) and any(is_traced(x) for x in a) for a in scalars))
    if not per_leaf:
        if in_place:
            getattr(torch, f"_foreach_{op}_")(tensors, *args, **kwargs)
            return tensors
        return list(getattr(torch, f"_foreach_{op}")(tensors, *args, **kwargs))
    out = []
    for i, t in enumerate(tensors):
        a = tuple(x[i] if isinstance(x, list) else x for x in args)
        k = {n: (v[i] if isinstance(v, list) else v) for n, v in kwargs.items()}
        out.append(_leaf_op(op, t, a, k, in_place))
    # (in place, each entry is the very tensor written into; under vmap it may be a new one)
    return out


def unflatten(leaves: list, spec, original: Tree, in_place: bool) -> Tree:
    """``leaves`` as a tree of ``spec``; ``original`` itself when ``in_place`` says the leaves are
    its own, written into (no new containers, as the donated step returns the donated trees)."""
    return original if in_place else pytree.tree_unflatten(leaves, spec)


Kernel = Callable[[Tree, Tree, Tree, Mode], "tuple[Tree, Tree, bool]"]


def transformation(init: InitFn, kernel: Kernel, *, fused: bool = False) -> GradientTransformation:
    """A stage whose ``update``, ``donated_update`` and (when ``fused``) ``fused_step`` all run
    the one ``kernel(updates, state, params, mode) -> (out, new_state, out_owned)``.

    ``out`` is the new updates, or the new parameters under ``mode.new_params``; ``out_owned``
    says the updates are temporaries of this step (see ``GradientTransformation``), and is
    ignored by the pure entry points.
    """
    def update(updates, state, params=None):
        out, new_state, _ = kernel(updates, state, params, Mode())
        return out, new_state

    def donated_update(updates, state, params, updates_owned):
        return kernel(updates, state, params, Mode(donate=True, updates_owned=updates_owned))

    def fused_step(updates, state, params, donate=False):
        new_params, new_state, _ = kernel(updates, state, params, Mode(donate=donate, new_params=True))
        return new_params, new_state
    return GradientTransformation(init, update, fused_step if fused else None, donated_update)


def _applied(params: Tree, updates: Tree, donate: bool) -> Tree:
    u, p, spec = flatten_like("apply_updates", "updates", updates, "params", params)
    return unflatten(foreach("add", p, u, in_place=donate), spec, params, donate)


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """New parameters ``params + updates``, leaf by leaf (one ``torch._foreach_add``); pure.

    params, updates: trees of the same structure, shapes and dtypes. Returns a new tree.
    """
    return _applied(params, updates, donate=False)


def run(t: GradientTransformation, updates: Tree, state: Tree, params: Tree, mode: Mode):
    """Run any stage ``t`` (a user's with only ``init`` and ``update`` too) as ``mode`` says,
    through the entry point it has: ``(out, new_state, out_owned)`` like a kernel.

    For new parameters: ``t.fused_step``, else its update followed by ``params + updates`` (in
    place when donated). For updates: ``t.donated_update`` when donating and ``t`` has one, else
    the pure ``t.update`` (whose outputs are then not known to be temporaries).
    """
    if mode.new_params:
        if t.fused_step is not None:
            # (pure calls keep the three-argument form, so a fused step written before donation works)
            new_params, state = (t.fused_step(updates, state, params, donate=True) if mode.donate
                                 else t.fused_step(updates, state, params))
            return new_params, state, False
        updates, state, _ = run(t, updates, state, params, mode._replace(new_params=False))
        return _applied(params, updates, mode.donate), state, False
    if mode.donate and t.donated_update is not None:
        return t.donated_update(updates, state, params, mode.updates_owned)
    updates, state = t.update(updates, state, params)
    return updates, state, False


def _memory_span(x: torch.Tensor) -> tuple[int, int]:
    """``[first byte, last byte + 1)`` of the memory ``x`` can address (views included)."""
    reach = sum((n - 1) * s for n, s in zip(x.shape, x.stride()))
    return x.data_ptr(), x.data_ptr() + (reach + 1) * x.element_size()


def check_donation(grads: Tree, state: Tree, params: Tree) -> None:
    """Refuse what ``step(..., donate=True)`` cannot write into safely (ValueError):

    * a tensor that requires grad or is wrapped by a torch.func transform (in any of the three
      trees): differentiating through the step needs the old values, so the step must be pure;
    * two donated tensors (params / state leaves) whose memory overlaps (each would be written
      twice), or a donated tensor overlapping a gradient (grads are never written).
    """
    spans = []   # (device, start, end, donated, where)
    for name, tree in (("grads", grads), ("state", state), ("params", params)):
        with_path, _ = pytree.tree_flatten_with_path(tree)
        for path, x in with_path:
            if not isinstance(x, torch.Tensor):
                continue
            where = f"{name} at {show(path_of(path))}"
            if torch._C._functorch.is_functorch_wrapped_tensor(x):
                raise ValueError(
                    "step: donate=True expected plain tensors, got a torch.func-wrapped tensor in "
                    f"{where}: inside torch.func transforms the step must be pure (donate=False)")
            if x.requires_grad:
                raise ValueError(
                    "step: donate=True expected tensors that do not require grad, got one in "
                    f"{where}: differentiating through the step needs the old values "
                    "(use donate=False)")
            if x.numel() == 0 or x.device.type == "meta":
                continue
            spans.append((str(x.device), *_memory_span(x), name != "grads", where))
    spans.sort(key=lambda s: (s[0], s[1]))
    # Sweep in address order; keep the donated and the gradient span reaching furthest so far.
    reach = {True: None, False: None}
    device = None
    for dev, start, end, donated, where in spans:
        if dev != device:
            device, reach = dev, {True: None, False: None}
        others = [reach[True]] + ([reach[False]] if donated else [])
        for other in others:
            if other is not None and other[0] > start:
                raise ValueError(
                    "step: donate=True expected donated tensors that share no memory with each "
                    f"other or with grads, got {where} overlapping {other[1]}")
        if reach[donated] is None or end > reach[donated][0]:
            reach[donated] = (end, where)


def step(opt: GradientTransformation, grads: Tree, state: Tree, params: Tree, *,
         donate: bool = False):
    """One optimizer step: ``(new_params, new_state)``.

    Equal to ``update`` then ``apply_updates``; when ``opt.fused_step`` exists it is used so that
    the new parameters come out of the same foreach call that applies the learning rate. This is
    the path training runs (see the module docstring).

    donate: False (default) mutates nothing. True donates ``params`` and ``state`` (not grads),
    as ``jax.jit(..., donate_argnums=...)`` does: the step writes the new values into their
    storage with torch.optim's in-place foreach operations (``_foreach_add_``, ``_foreach_mul_``,
    ``_foreach_lerp_``, ``_foreach_addcmul_``, ``_foreach_addcdiv_``, ...) and returns those same
    tensors (a few small leaves, e.g. step counters, are new). The results are bit-identical to
    ``donate=False``. **Donated arguments must not be used afterwards; their contents are
    unspecified** (also when the step raises): rebind the names to what ``step`` returns. grads
    are only read. Donation refuses, with ValueError, tensors that require grad or are wrapped by
    a torch.func transform (differentiate through the pure step instead) and donated tensors
    that share memory with each other or with grads.
    """
    if not isinstance(opt, GradientTransformation):
        raise TypeError(f"step: expected a GradientTransformation, got {type(opt).__name__}")
    if not isinstance(donate, bool):
        raise TypeError(f"step: expected donate to be a bool, got {type(donate).__name__}")
    flatten_like("step", "grads", grads, "params", params)
    if donate:
        check_donation(grads, state, params)
    new_params, new_state, _ = run(opt, grads, state, params, Mode(donate=donate, new_params=True))
    return new_params, new_state


def _find_field(tree: Tree, field: str):
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        if field in tree._fields:
            return getattr(tree, field)
        children = list(tree)
    elif isinstance(tree, (tuple, list)):
        children = list(tree)
    elif isinstance(tree, dict):
        children = list(tree.values())
    else:
        return None
    for child in children:
        found = _find_field(child, field)
        if found is not None:
            return found
    return None


def _required_field(state: Tree, field: str, where: str, source: str):
    value = _find_field(state, field)
    if value is None:
        article = "an" if field[0] in "aeiolr" else "a"   # "an 'lr'", "a 'count'"
        raise ValueError(f"{where}: expected an optimizer state holding {article} {field!r} field"
                         f"{source}, got {type(state).__name__}")
    return value


def current_lr(state: Tree) -> float:
    """The learning rate the next update will use (the first ``lr`` field found in ``state``)."""
    return float(_required_field(state, "lr", "current_lr",
                                 " (from sgd/adam/adamw/scale_by_learning_rate)"))


def current_step(state: Tree) -> int:
    """How many updates produced ``state`` (the first ``count`` field found in it)."""
    return int(_required_field(state, "count", "current_step", ""))
