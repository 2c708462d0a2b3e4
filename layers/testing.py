"""Property-based checks of a pure layer against its torch.nn module: a public testing library.

A layer is a function of its parameters and its input, ``fn(params, x, **kwargs) -> y``, or, when
it keeps state (batch norm), ``fn(params, state, x, *, train, **kwargs) -> (y, state)``.
:func:`check_layer` draws cases (a :class:`Case`: the torch.nn module that is the reference, the
keyword arguments of ``fn``, the input shape) and, for each, a dtype, a memory layout, a kind of
values and a seed, and checks

* the forward output (shape, dtype, values) against ``torch.func.functional_call(module, ...)``;
* the vector-Jacobian product with a random cotangent, with respect to the input and to every
  parameter, against torch's autograd of the module;
* the new state against the module's buffers after the same call (stateful layers, train and
  eval, ``Case.steps`` calls in a row);
* purity: ``params``, ``state`` and ``x`` are bit-identical after the call;
* ``torch.func.vmap`` over the batch against a loop over the samples (when ``Case.batched``; for a
  stateful layer in eval only, since training mixes the samples through the batch statistics);
* optionally which backward ran (``Case.backward``: an ``autograd.Function`` class that must
  appear in the autograd graph, or ``"builtin"`` for none at all), so that two formulations
  that give equal values cannot be swapped unnoticed.

Tolerances come from the dtype and the reduction length ``n`` (``Case.reduction``, the longest
sum any output or gradient entry is made of; by default the number of input elements):

    rtol = atol = n * eps(dtype) ** (4/5)       float64: n * 3.1e-13, float32: n * 2.8e-6

A rounding error of a length-``n`` sum grows at most linearly in ``n``; ``eps ** (4/5)`` instead
of ``eps`` leaves room for a layer that amplifies it (a normalisation's ``1 / sigma``) by up to
``eps ** (-1/5)``: 1300 in float64, 24 in float32. A wrong term is off by O(1) and still fails.

A failure raises ``AssertionError`` whose message ends with a runnable snippet: the shrunk case
passed to :func:`check_case`, which replays it without hypothesis (hypothesis's own
``@reproduce_failure`` line is printed too).

    import torch, layers
    from hypothesis import strategies as st
    from layers.testing import Case, check_layer

    cases = st.builds(lambda c, n: Case(torch.nn.Linear(c, 3), {}, (n, c)),
                      st.integers(1, 5), st.integers(1, 4))
    check_layer(layers.linear, cases, max_examples=20)

The strategies of purenn's own layers (:func:`conv2d_cases`, :func:`batch_norm_cases`, ...) are
the ones its test suite draws from. docs/testing.md has worked examples.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import importlib
import inspect
import math
import pickle
import re
from typing import Any, Callable, Optional

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "Case", "DTYPES", "IMPLS", "LAYOUTS", "VALUE_KINDS", "activation_cases", "adaptive_avg_pool2d_cases",
    "autograd_nodes", "batch_norm_cases", "check_autograd_function", "check_case", "check_layer",
    "conv2d_cases", "cross_entropy_cases", "custom_backward_nodes", "dtypes", "fixed_tolerance",
    "impls", "layouts", "linear_cases", "make_input", "max_pool2d_cases", "named", "seeds",
    "shapes", "tolerance", "unpickle", "value_kinds", "with_layout",
]

LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced")
#: normal: N(0, 1) * scale + shift; ints: few small integers (exact zeros, ties, constant
#: channels); extremes: normal values times 10^k, k uniform in [-3, 3] per element.
VALUE_KINDS = ("normal", "ints", "extremes")
DTYPES = (torch.float64, torch.float32)
IMPLS = ("fast", "explicit")


# ----------------------------------------------------------------------------- inputs

def with_layout(base, layout):
    """``base``'s values in another memory layout: ``"channels_last"`` (4-D only; others stay
    contiguous), ``"transposed"`` (last two axes stored swapped), ``"sliced"`` (every other
    element of a twice-as-wide buffer), or ``"contiguous"``."""
    if layout not in LAYOUTS:
        raise ValueError(f"with_layout: expected layout in {LAYOUTS}, got {layout!r}")
    if layout == "channels_last" and base.dim() == 4:
        return base.contiguous(memory_format=torch.channels_last)
    if layout == "transposed" and base.dim() >= 2:
        return base.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and base.dim() >= 1:
        big = torch.zeros(base.shape[:-1] + (2 * base.shape[-1],), dtype=base.dtype)
        big[..., ::2] = base
        return big[..., ::2]
    return base


def make_input(shape, seed, dtype, layout, values, *, int_range=(-1, 2), scale=1.0, shift=0.0):
    """A seeded tensor of ``shape`` and ``dtype`` in ``layout`` (see :func:`with_layout`).

    ``values="ints"``: integers drawn uniformly from ``int_range`` (half-open); ``"normal"``:
    ``N(0, 1) * scale + shift``; ``"extremes"``: the normal values times ``10^k``, ``k`` uniform
    in [-3, 3] per element.
    """
    if values not in VALUE_KINDS:
        raise ValueError(f"make_input: expected values in {VALUE_KINDS}, got {values!r}")
    g = torch.Generator().manual_seed(seed)
    if values == "ints":
        base = torch.randint(*int_range, tuple(shape), generator=g).to(dtype)
    else:
        base = torch.randn(tuple(shape), generator=g, dtype=dtype) * scale + shift
        if values == "extremes":
            base = base * 10.0 ** (torch.rand(tuple(shape), generator=g, dtype=dtype) * 6 - 3)
    return with_layout(base, layout)


def seeds():
    """Seeds for :func:`make_input` and parameter draws."""
    return st.integers(0, 2**31 - 1)


def dtypes(choices=DTYPES):
    return st.sampled_from(tuple(choices))


def layouts(choices=LAYOUTS):
    return st.sampled_from(tuple(choices))


def value_kinds(choices=("normal", "ints")):
    return st.sampled_from(tuple(choices))


def impls():
    return st.sampled_from(IMPLS)


def shapes(min_rank=1, max_rank=4, min_side=1, max_side=4):
    """Tuples of ``min_rank..max_rank`` sides, each in ``min_side..max_side``."""
    return st.lists(st.integers(min_side, max_side), min_size=min_rank, max_size=max_rank).map(tuple)


# ----------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn case: ``module`` is the reference (its parameters are redrawn from the seed by
    the checker), ``kwargs`` go to the layer function, ``input_shape`` is the input's shape.

    reduction: the longest sum an output or gradient entry is made of (the tolerance's ``n``);
        None: the number of input elements.
    batched: axis 0 of the input is a batch of independent samples (vmap checked against a loop).
    backward: the ``autograd.Function`` class that must run (a tuple: one of them), ``"builtin"``
        for none, or None to not look.
    steps: calls in a row of a stateful layer, each with a new input and the state it returned.
    input_options: keyword arguments of :func:`make_input` (``int_range``, ``scale``, ``shift``).
    """
    module: torch.nn.Module
    kwargs: dict
    input_shape: tuple
    reduction: Optional[int] = None
    batched: bool = True
    backward: Any = None
    steps: int = 1
    input_options: dict = dataclasses.field(default_factory=dict)

    def __repr__(self):
        fields = [f"module={_module_source(self.module)}", f"kwargs={_source(self.kwargs)}",
                  f"input_shape={tuple(self.input_shape)!r}"]
        for f in dataclasses.fields(self)[3:]:
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                fields.append(f"{f.name}={_source(value)}")
        return "Case(" + ", ".join(fields) + ")"


def named(path):
    """The object at a dotted path (``"layers.conv.ExplicitConv2d"``): replay snippets use it to
    name functions and classes."""
    module, _, attr = path.rpartition(".")
    while module:
        try:
            obj = importlib.import_module(module)
            break
        except ImportError:
            module, _, head = module.rpartition(".")
            attr = f"{head}.{attr}"
    else:
        raise ValueError(f"named: expected a dotted path to an importable object, got {path!r}")
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _source(value):
    """Python source that rebuilds ``value`` (dtypes, classes, functions and containers)."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, type) or inspect.isfunction(value) or inspect.isbuiltin(value):
        qualified = f"{value.__module__}.{value.__qualname__}"
        if "<" not in qualified:
            return f"named({qualified!r})"
        return value.__qualname__
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_source(k)}: {_source(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_source(v) for v in value)
        return f"({inner},)" if isinstance(value, tuple) and len(value) == 1 else (
            f"({inner})" if isinstance(value, tuple) else f"[{inner}]")
    return repr(value)


def _module_source(module):
    """``torch.nn.Conv2d(3, 4, ...)`` when the module's repr rebuilds it, else
    ``unpickle("...")`` (its pickle in base64; a module class defined in a test file is found by
    its import path)."""
    plain = f"torch.nn.{module!r}"
    # torch's reprs print string options bare (padding=same): quote them.
    quoted = re.sub(r"=(?!True\b|False\b|None\b)([A-Za-z_]\w*)(?=[,)])", r"='\1'", plain)
    for text in (plain, quoted):
        try:
            rebuilt = eval(text, {"torch": torch})            # noqa: S307 (a repr we made)
            if type(rebuilt) is type(module) and repr(rebuilt) == repr(module) and all(
                    a.shape == b.shape for a, b in zip(rebuilt.state_dict().values(),
                                                       module.state_dict().values())):
                return text
        except Exception:                                    # noqa: BLE001 (any failure: pickle)
            pass
    try:
        return f"unpickle({base64.b64encode(pickle.dumps(module)).decode()!r})"
    except Exception:                                        # noqa: BLE001
        return "your_module()"


def unpickle(text):
    """The object pickled in base64 ``text`` (replay snippets use it for modules whose repr does
    not rebuild them)."""
    return pickle.loads(base64.b64decode(text))              # noqa: S301 (our own snippet)


# ----------------------------------------------------------------------------- tolerance

def tolerance(dtype, reduction):
    """``rtol = atol = n * eps(dtype) ** (4/5)`` for a reduction of length ``n`` (see the module
    docstring for why)."""
    t = max(int(reduction), 1) * torch.finfo(dtype).eps ** 0.8
    return dict(rtol=t, atol=t)


def fixed_tolerance(table):
    """A ``tolerance`` argument that ignores the reduction length: ``table[dtype]`` (a dict of
    ``rtol`` and ``atol``), for tests that keep a tolerance table justified case by case."""
    return lambda dtype, reduction: table[dtype]


# ----------------------------------------------------------------------------- autograd graphs

def autograd_nodes(y):
    """Every node of the autograd graph that produced ``y`` (a list, outputs first)."""
    seen, order, stack = set(), [], [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return order


def custom_backward_nodes(y):
    """Names of the ``autograd.Function`` backward nodes in ``y``'s graph (``"ExplicitReLUBackward"``)."""
    return {type(n).__name__ for n in autograd_nodes(y)
            if isinstance(n, torch.autograd.function.BackwardCFunction)}


def _check_backward(expected, y, where):
    if expected is None or not isinstance(y, torch.Tensor) or y.grad_fn is None:
        return
    found = custom_backward_nodes(y)
    if expected == "builtin":
        assert not found, f"{where}: expected only torch's own backward nodes, got {sorted(found)}"
        return
    wanted = expected if isinstance(expected, tuple) else (expected,)
    names = {f"{cls.__name__}Backward" for cls in wanted}
    assert names & found, (f"{where}: expected the backward of {sorted(names)} in the autograd graph "
                           f"(the formulation asked for), got {sorted(found) or 'torch builtins only'}")


# ----------------------------------------------------------------------------- the checker

def _is_stateful(fn):
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "state" in parameters or "train" in parameters


def prepared_module(module, dtype, seed):
    """A copy of ``module`` in ``dtype`` with parameters and buffers redrawn from ``seed``:

    * parameters of rank >= 2: uniform in ``[-1, 1] / sqrt(fan_in)`` (torch's default scale);
    * other parameters named ``*weight`` (a normalisation's scale): uniform in ``[0.5, 1.5)``;
      the rest (biases): uniform in ``[-1, 1)``;
    * floating buffers named ``*var*``: uniform in ``[0.5, 1.5)``; other floating buffers:
      ``N(0, 1)``; integer buffers (``num_batches_tracked``): ``seed % 6``.
    """
    m = copy.deepcopy(module).to(dtype)
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return torch.rand(shape, generator=g, dtype=dtype) * (high - low) + low

    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                bound = 1.0 / math.sqrt(max(p[0].numel(), 1))
                p.copy_(uniform(p.shape, -bound, bound))
            elif name.rsplit(".", 1)[-1] == "weight":
                p.copy_(uniform(p.shape, 0.5, 1.5))
            else:
                p.copy_(uniform(p.shape, -1.0, 1.0))
        for name, b in m.named_buffers():
            if b.is_floating_point():
                b.copy_(uniform(b.shape, 0.5, 1.5) if "var" in name.rsplit(".", 1)[-1]
                        else torch.randn(b.shape, generator=g, dtype=dtype))
            else:
                b.fill_(seed % 6)
    return m


def _close(got, want, tol, what):
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}"
    assert got.shape == want.shape, f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}"
    assert got.dtype == want.dtype, f"{what}: expected dtype {want.dtype}, got {got.dtype}"
    if not want.is_floating_point():
        assert torch.equal(got, want), f"{what}: expected {want.tolist()}, got {got.tolist()}"
        return
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


def _unchanged(before, after, what):
    for k in before:
        assert torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype, \
            f"purity: the layer wrote into its argument {what}[{k!r}]"


def _fn_source(fn):
    qualified = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
    if "<" in qualified or "?" in qualified:
        return "fn"
    return f"named({qualified!r})"


def _replay_snippet(fn, case, options):
    args = ", ".join(f"{k}={_source(v)}" for k, v in options.items())
    fn_text = _fn_source(fn)
    note = "# fn: your layer function, as passed to check_layer\n" if fn_text == "fn" else ""
    return ("import torch\n"
            "from layers.testing import Case, check_case, named, unpickle\n"
            f"{note}check_case({fn_text}, {case!r}, {args})")


def check_case(fn, case, *, dtype=torch.float64, layout="contiguous", values="normal", seed=0,
               train=False, stateful=None, tolerance=tolerance):
    """Check ``fn`` on one :class:`Case` (what :func:`check_layer` runs for every drawn case);
    raise AssertionError, whose message ends with the call that replays it."""
    options = dict(dtype=dtype, layout=layout, values=values, seed=seed)
    is_stateful = _is_stateful(fn) if stateful is None else stateful
    try:
        _check_case(fn, case, dtype, layout, values, seed, train, is_stateful, tolerance)
    except Exception as error:                   # noqa: BLE001 (a layer that raises fails too)
        if is_stateful:
            options["train"] = train
        if stateful is not None:
            options["stateful"] = stateful
        raise AssertionError(f"{type(error).__name__}: {error}\n\nReplay this case:\n"
                             f"{_replay_snippet(fn, case, options)}") from error


def _check_case(fn, case, dtype, layout, values, seed, train, stateful, tolerance):
    module = prepared_module(case.module, dtype, seed)
    module.train(bool(train) if stateful else False)
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    state = {k: v.detach().clone() for k, v in module.named_buffers()}
    n = case.reduction if case.reduction is not None else math.prod(case.input_shape)
    tol = tolerance(dtype, n)

    def call(p, s, x):
        if stateful:
            return fn(p, s, x, train=train, **case.kwargs)
        return fn(p, x, **case.kwargs), {}

    for step in range(case.steps if stateful else 1):
        where = f"step {step}: " if case.steps > 1 and stateful else ""
        x = make_input(case.input_shape, seed + step, dtype, layout, values, **case.input_options)

        # The reference: the module through functional_call (which writes new running statistics
        # into the buffers it is given, hence the clones) and torch's autograd.
        ref_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        ref_state = {k: v.clone() for k, v in state.items()}
        ref_x = x.detach().clone().requires_grad_(True)
        ref_y = functional_call(module, {**ref_params, **ref_state}, (ref_x,))
        cotangent = torch.randn(ref_y.shape, generator=torch.Generator().manual_seed(seed + 1 + step),
                                dtype=ref_y.dtype)
        wrt = [ref_x, *ref_params.values()]
        ref_grads = torch.autograd.grad((ref_y * cotangent).sum(), wrt, allow_unused=True)
        ref_grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, ref_grads)]

        before = ({k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in state.items()},
                  x.clone())
        y, pullback, new_state = vjp(lambda p, x: call(p, state, x), params, x, has_aux=True)
        _close(y, ref_y.detach(), tol, f"{where}forward output")
        g_params, g_x = pullback(cotangent)
        _close(g_x, ref_grads[0], tol, f"{where}gradient with respect to the input")
        assert set(g_params) == set(params), \
            f"{where}gradient: expected parameters {sorted(params)}, got {sorted(g_params)}"
        for k, want in zip(ref_params, ref_grads[1:]):
            _close(g_params[k], want, tol, f"{where}gradient with respect to parameter {k!r}")
        if stateful:
            assert isinstance(new_state, dict) and set(new_state) == set(ref_state), \
                f"{where}state: expected keys {sorted(ref_state)}, got {new_state!r}"
            for k in ref_state:
                _close(new_state[k], ref_state[k], tol, f"{where}state {k!r} after the call (train={train})")
        _unchanged(before[0], params, "params")
        _unchanged(before[1], state, "state")
        _unchanged({"x": before[2]}, {"x": x}, "input")

        if case.backward is not None:
            eager_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            eager_y, _ = call(eager_params, state, x.clone().requires_grad_(True))
            _check_backward(case.backward, eager_y, f"{where}backward")

        # A stateful layer mixes the samples in training, and in eval without running statistics.
        if case.batched and case.input_shape[0] > 0 and not (stateful and (train or not state)):
            per_sample = vmap(lambda xi: call(params, state, xi.unsqueeze(0))[0])(x)
            loop = torch.stack([call(params, state, x[i:i + 1])[0] for i in range(x.shape[0])])
            _close(per_sample, loop, tol, f"{where}vmap over the batch against a loop over the samples")
            _close(loop.flatten(0, 1), y, tol, f"{where}a loop over the samples against the batched call")
        if stateful:
            state = new_state


def check_layer(fn, cases, *, max_examples=50, dtypes=DTYPES, layouts=LAYOUTS,
                values=("normal", "ints"), train=(True, False), stateful=None, tolerance=tolerance):
    """Check ``fn`` against each drawn :class:`Case`'s module (see the module docstring for what
    is checked), over ``max_examples`` cases, each with a drawn dtype, layout, value kind and
    seed (and, for a stateful layer, ``train``).

    ``fn(params, x, **case.kwargs) -> y``, or, when ``fn`` has a parameter named ``state`` or
    ``train`` (or ``stateful=True``),
    ``fn(params, state, x, *, train, **case.kwargs) -> (y, state)``. ``tolerance(dtype, n)`` gives
    the ``rtol`` / ``atol`` of a reduction of length ``n`` (default :func:`tolerance`). A failure
    raises AssertionError with the shrunk case as a :func:`check_case` call.
    """
    @settings(max_examples=max_examples, deadline=None, print_blob=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=cases, dtype=st.sampled_from(tuple(dtypes)), layout=st.sampled_from(tuple(layouts)),
           kind=st.sampled_from(tuple(values)), seed=seeds(), training=st.sampled_from(tuple(train)))
    def check_drawn_case(case, dtype, layout, kind, seed, training):
        check_case(fn, case, dtype=dtype, layout=layout, values=kind, seed=seed, train=training,
                   stateful=stateful, tolerance=tolerance)

    check_drawn_case()


# ----------------------------------------------------------------------------- written-out backwards

def check_autograd_function(f, inputs, *, batch_size=3, seed=0, check_double_backward=True,
                            tol=dict(rtol=1e-10, atol=1e-10)):
    """Checks of a written-out backward (an ``autograd.Function`` reached by ``f``), in float64:

    * ``torch.autograd.gradcheck`` (and ``gradgradcheck`` unless ``check_double_backward=False``)
      of ``f(*inputs)`` against finite differences;
    * its vmap rule: ``vmap(f)`` and ``vmap`` of its vector-Jacobian product over a new leading
      axis of ``batch_size`` perturbed copies of ``inputs`` equal a loop over the copies (``tol``:
      the same float64 ops in another batching, ~1e-15 apart).

    ``inputs``: float64 tensors, all differentiated (close over the others in ``f``), without
    ties or kinks (finite differences are meaningless there).
    """
    inputs = tuple(t.detach().to(torch.float64).requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(f, inputs), "gradcheck failed"
    if check_double_backward:
        assert torch.autograd.gradgradcheck(f, inputs), "gradgradcheck failed"
    g = torch.Generator().manual_seed(seed)
    batched = [torch.stack([t.detach() + 1e-3 * k * torch.randn(t.shape, generator=g, dtype=t.dtype)
                            for k in range(batch_size)]) for t in inputs]
    ys = vmap(f)(*batched)
    loop = _stack([f(*(b[k] for b in batched)) for k in range(batch_size)])
    torch.testing.assert_close(ys, loop, **tol, msg=lambda m: f"vmap of the forward against a loop: {m}")
    cotangents = tree_map(lambda y: torch.randn(y.shape, generator=g, dtype=y.dtype), ys)

    def pull(c, *a):
        return vjp(f, *a)[1](c)

    got = vmap(pull)(cotangents, *batched)
    want = _stack([pull(tree_map(lambda c: c[k], cotangents), *(b[k] for b in batched))
                   for k in range(batch_size)])
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tol,
                                   msg=lambda m: f"vmap of the backward against a loop, input {i}: {m}")


def _stack(trees):
    """Trees of equal structure stacked leaf by leaf along a new axis 0."""
    leaves = [tree_flatten(t)[0] for t in trees]
    return tree_unflatten([torch.stack(column) for column in zip(*leaves)], tree_flatten(trees[0])[1])


# ----------------------------------------------------------------------------- purenn's layers

def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _explicit(module_name, class_name, impl):
    if impl == "fast":
        return "builtin"
    return getattr(importlib.import_module(f"layers.{module_name}"), class_name)


@st.composite
def conv2d_cases(draw, impls=impls(), max_batch=3):
    """``layers.conv2d`` against ``torch.nn.Conv2d``: groups 1-3, kernels 1-3, int or pair
    stride / dilation / padding (``"same"``, ``"valid"``), bias or not, unbatched (batch 0)."""
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = draw(st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))))
    padding = draw(st.one_of(st.just("same"), st.just("valid"), st.integers(0, 2),
                             st.tuples(st.integers(0, 2), st.integers(0, 2))))
    stride = 1 if padding == "same" else draw(
        st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    d2 = _pair(dilation)
    p2 = None if padding == "same" else ((0, 0) if padding == "valid" else _pair(padding))
    spatial = []
    for axis, (k, d) in enumerate(zip(kernel, d2)):
        need = 1 if p2 is None else max(1, d * (k - 1) + 1 - 2 * p2[axis])
        spatial.append(draw(st.integers(need, need + 4)))
    n = draw(st.integers(0, max_batch))                     # 0: unbatched (C, H, W)
    impl = draw(impls)
    bias = draw(st.booleans())
    hyper = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return Case(torch.nn.Conv2d(cin, cout, kernel, bias=bias, **hyper), dict(hyper, impl=impl),
                ((n,) if n else ()) + (cin, *spatial), reduction=cin // groups * kernel[0] * kernel[1],
                batched=bool(n), backward=_explicit("conv", "ExplicitConv2d", impl),
                input_options=dict(int_range=(-2, 3)))


@st.composite
def linear_cases(draw, impls=impls()):
    """``layers.linear`` against ``torch.nn.Linear``: 0-3 leading axes, 1-8 features."""
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))
    fan_in, fan_out = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    impl = draw(impls)
    return Case(torch.nn.Linear(fan_in, fan_out, bias=draw(st.booleans())), dict(impl=impl),
                lead + (fan_in,), reduction=fan_in, batched=bool(lead),
                backward=_explicit("linear", "ExplicitLinear", impl))


def _no_padding_only_window(spatial, kernel, padding, dilation, stride):
    """torch gives -inf for a window of padding only (and its backward corrupts memory); purenn
    refuses it, so such cases are not parity cases."""
    return all(any(0 <= i * s - p + u * d < size for u in range(k))
               for size, k, p, d, s in zip(spatial, kernel, padding, dilation, stride)
               for i in range(p))


@st.composite
def max_pool2d_cases(draw, impls=impls(), max_batch=2):
    """``layers.max_pool2d(x, **kwargs)`` against ``torch.nn.MaxPool2d``: kernels 1-3, padding
    up to half the kernel, dilation, stride (None: the kernel), ceil mode; int forms too."""
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = draw(st.one_of(st.none(), st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    spatial = [draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), d * (k - 1) + 6))
               for k, p, d in zip(kernel, padding, dilation)]
    assume(_no_padding_only_window(spatial, kernel, padding, dilation,
                                   kernel if stride is None else _pair(stride)))
    as_int = lambda t: t[0] if t[0] == t[1] and draw(st.booleans()) else t   # noqa: E731
    hyper = dict(kernel_size=as_int(kernel), stride=stride, padding=as_int(padding),
                 dilation=as_int(dilation), ceil_mode=draw(st.booleans()))
    n, c, impl = draw(st.integers(0, max_batch)), draw(st.integers(1, 3)), draw(impls)
    return Case(torch.nn.MaxPool2d(**hyper), dict(hyper, impl=impl), ((n,) if n else ()) + (c, *spatial),
                reduction=kernel[0] * kernel[1], batched=bool(n),
                backward=_explicit("pooling", "ExplicitMaxPool2d", impl))


@st.composite
def adaptive_avg_pool2d_cases(draw, impls=impls(), max_batch=2):
    """``layers.adaptive_avg_pool2d(x, **kwargs)`` against ``torch.nn.AdaptiveAvgPool2d``:
    inputs 1-9 square, output sizes 1-10 (larger than the input too), None for "keep"."""
    spatial = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    out = draw(st.one_of(st.integers(1, 10), st.tuples(st.one_of(st.none(), st.integers(1, 10)),
                                                       st.one_of(st.none(), st.integers(1, 10)))))
    n, c, impl = draw(st.integers(0, max_batch)), draw(st.integers(1, 3)), draw(impls)
    o = [s if v is None else v for s, v in zip(spatial, _pair(out))]
    largest_bin = math.prod(-(-s // v) + 1 for s, v in zip(spatial, o))
    return Case(torch.nn.AdaptiveAvgPool2d(out), dict(output_size=out, impl=impl),
                ((n,) if n else ()) + (c, *spatial), reduction=min(largest_bin, spatial[0] * spatial[1]),
                batched=bool(n), backward=_explicit("pooling", "ExplicitAdaptiveAvgPool2d", impl))


@st.composite
def batch_norm_cases(draw, impls=impls(), max_steps=3):
    """``layers.batch_norm(params, state, x, *, train, **kwargs)`` against
    ``torch.nn.BatchNorm1d`` / ``2d``: ranks 2-4, affine or not, running statistics or not,
    momentum None, 0, 1 or any in [0, 1], eps, ``1..max_steps`` calls in a row. Inputs are off
    zero mean and unit variance (normal * 2 + 0.5)."""
    rank = draw(st.sampled_from([2, 3, 4]))
    n = draw(st.integers(1, 3))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(rank - 2))
    if n * math.prod(spatial) == 1:
        n = 2                                          # one value per channel is an error case
    c = draw(st.integers(1, 4))
    momentum = draw(st.one_of(st.none(), st.sampled_from([0.0, 0.1, 1.0]), st.floats(0, 1)))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    cls = torch.nn.BatchNorm1d if rank < 4 else torch.nn.BatchNorm2d
    module = cls(c, eps=eps, momentum=momentum, affine=draw(st.booleans()),
                 track_running_stats=draw(st.booleans()))
    impl = draw(impls)
    backward = "builtin" if impl == "fast" else (
        named("layers.batch_norm.ExplicitBatchNormTrain"), named("layers.batch_norm.ExplicitBatchNormEval"))
    return Case(module, dict(momentum=momentum, eps=eps, impl=impl), (n, c) + spatial,
                reduction=n * math.prod(spatial), backward=backward,
                steps=draw(st.integers(1, max_steps)), input_options=dict(scale=2.0, shift=0.5))


@st.composite
def cross_entropy_cases(draw, impls=impls()):
    """Options of ``layers.cross_entropy`` as a dict (``shape`` of the logits, ``classes``,
    ``probabilities`` targets or indices, class ``weight`` or not, ``reduction``,
    ``label_smoothing``, ``ignore_index``, ``impl``): a loss takes a target, not parameters, so
    it is checked against ``F.cross_entropy`` directly."""
    classes = draw(st.integers(1, 5))
    batched = draw(st.booleans())
    extra = tuple(draw(st.lists(st.integers(1, 3), max_size=2))) if batched else ()
    lead = (draw(st.integers(1, 3)),) if batched else ()
    probabilities = draw(st.booleans())
    return dict(
        shape=lead + (classes,) + extra, classes=classes, probabilities=probabilities,
        weight=draw(st.booleans()), reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))),
        ignore_index=-100 if probabilities else draw(st.one_of(st.just(-100), st.integers(0, classes - 1))),
        impl=draw(impls))


@st.composite
def activation_cases(draw, name, impls=impls()):
    """``layers.<name>(x, **kwargs)`` against its torch.nn module, for ``name`` in ``"relu"``,
    ``"gelu"``, ``"log_softmax"`` (any ``dim``) and ``"flatten"`` (any ``start_dim <=
    end_dim``, negative forms too): inputs of rank 1-4 with sides 1-4, values normal * 5 or ints
    in [-2, 2] (exact zeros and ties)."""
    shape = draw(shapes(1, 4, 1, 4))
    rank, impl = len(shape), draw(impls)
    options = dict(int_range=(-2, 3), scale=5.0)
    if name in ("relu", "gelu"):
        module = torch.nn.ReLU() if name == "relu" else torch.nn.GELU()
        backward = _explicit("activations", "ExplicitReLU" if name == "relu" else "ExplicitGELU", impl)
        return Case(module, dict(impl=impl), shape, reduction=1, backward=backward, input_options=options)
    if name == "log_softmax":
        dim = draw(st.integers(-rank, rank - 1))
        return Case(torch.nn.LogSoftmax(dim), dict(dim=dim, impl=impl), shape, reduction=shape[dim],
                    batched=dim % rank != 0, backward=_explicit("activations", "ExplicitLogSoftmax", impl),
                    input_options=options)
    if name == "flatten":
        start = draw(st.integers(-rank, rank - 1))
        end = draw(st.integers(start % rank, rank - 1)) - draw(st.sampled_from([0, rank]))
        # the explicit formulation is a reshape: no written-out backward to look for
        return Case(torch.nn.Flatten(start, end), dict(start_dim=start, end_dim=end, impl=impl), shape,
                    reduction=1, batched=start % rank != 0, input_options=options)
    raise ValueError(f"activation_cases: expected name in ('relu', 'gelu', 'log_softmax', 'flatten'), "
                     f"got {name!r}")
