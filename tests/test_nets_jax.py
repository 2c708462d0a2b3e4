"""Specification of nets.jax_interop: zero-copy, structure-preserving, clear without jax.

Everything but the first test needs jax (the optional extra ``purenn[jax]``) and is skipped
cleanly without it.
"""

import math
import sys
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_support import x64
from nets.jax_interop import from_jax, to_jax

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
          torch.int32, torch.uint8, torch.bool]


class AdamState(NamedTuple):
    count: torch.Tensor
    mu: dict
    nu: dict


class Pair(NamedTuple):
    first: object
    second: object


# ------------------------------------------------------------------------- without jax


@pytest.mark.parametrize("fn", [to_jax, from_jax])
def test_without_jax_both_directions_raise_import_error_naming_the_extra(monkeypatch, fn):
    monkeypatch.setitem(sys.modules, "jax", None)  # makes `import jax` fail, installed or not
    with pytest.raises(ImportError) as info:
        fn({"w": torch.ones(2)})
    assert "pip install 'purenn[jax]'" in str(info.value)
    assert fn.__name__ in str(info.value)


# ---------------------------------------------------------------------------- with jax


@pytest.fixture
def jax():
    return pytest.importorskip("jax")


@st.composite
def tensors(draw):
    """Fresh contiguous tensors of every DLPack dtype with arbitrary bits, 0-d and empty too."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (math.prod(shape) * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape).clone()  # clone: a fresh, aligned allocation


trees = st.recursive(
    st.one_of(tensors(), st.integers(), st.floats(), st.booleans(), st.none()),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text("abc.0", max_size=4), children, max_size=3),
        st.builds(Pair, children, children),
    ),
    max_leaves=10,
)


def bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def pairs(a, b, path=""):
    """Matching leaves of two trees of the same structure (and the same container types)."""
    if isinstance(a, (dict, list, tuple)) or isinstance(b, (dict, list, tuple)):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            yield from pairs(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            yield from pairs(x, y, f"{path}/{i}")
    else:
        yield path, a, b


# The `jax` fixture only hands over the module, so sharing it between examples is harmless.
@settings(deadline=None, max_examples=60,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_round_trip_shares_memory_and_keeps_structure_bits_and_dtypes(jax, tree):
    with x64(jax):
        as_jax = to_jax(tree)
        back = from_jax(as_jax)
    for path, got, want in pairs(back, tree):
        if not isinstance(want, torch.Tensor):
            assert got is want, path  # scalars and None pass through untouched
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(bits(got), bits(want)), path
        if want.numel() > 0:  # an empty tensor has no buffer to share
            assert got.data_ptr() == want.data_ptr(), f"{path}: copied"
    for path, arr, t in pairs(as_jax, tree):
        if isinstance(t, torch.Tensor):
            assert isinstance(arr, jax.Array), path
            assert tuple(arr.shape) == tuple(t.shape), path
            if t.numel() > 0:
                assert arr.unsafe_buffer_pointer() == t.data_ptr(), f"{path}: copied"


def test_optimizer_state_survives_jax_tree_map_as_namedtuple(jax):
    g = torch.Generator().manual_seed(0)
    params = {"features.0.weight": torch.randn(4, 3, 3, 3, generator=g),
              "classifier.bias": torch.randn(10, generator=g)}
    opt_state = (AdamState(torch.tensor(3, dtype=torch.int32), params,
                           {k: v * v for k, v in params.items()}), None)
    doubled = from_jax(jax.tree_util.tree_map(lambda x: x * 2, to_jax(opt_state)))
    assert isinstance(doubled, tuple) and doubled[1] is None
    assert isinstance(doubled[0], AdamState) and isinstance(doubled[0].mu, dict)
    assert int(doubled[0].count) == 6
    for k, v in params.items():
        assert torch.equal(doubled[0].mu[k], v * 2)  # x2 is exact in float32


def test_jax_arrays_share_memory_with_the_tensors(jax):
    t = torch.zeros(5)
    arr = to_jax(t)
    assert arr.unsafe_buffer_pointer() == t.data_ptr()
    back = from_jax(arr)
    assert back.data_ptr() == t.data_ptr()


def test_requires_grad_tensors_are_detached_and_still_shared(jax):
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    arr = to_jax({"w": w})["w"]
    assert arr.unsafe_buffer_pointer() == w.data_ptr()
    back = from_jax(arr)
    assert not back.requires_grad and torch.equal(back, w.detach())


def test_non_contiguous_tensors_are_copied_into_row_major_order(jax):
    base = torch.arange(12.0).reshape(3, 4)
    for view in (base.t(), base[:, ::2]):
        arr = to_jax(view)
        assert arr.shape == view.shape
        assert torch.equal(from_jax(arr), view)


def test_bool_tensors_round_trip(jax):
    m = torch.tensor([[True, False], [False, True]])
    arr = to_jax(m)
    assert arr.dtype == bool and torch.equal(from_jax(arr), m)


def test_64_bit_tensors_are_refused_while_jax_x64_is_off(jax):
    with x64(jax, enabled=False):
        for dtype in (torch.float64, torch.int64):
            with pytest.raises(ValueError, match=r"at 'opt/key'.*jax_enable_x64"):
                to_jax({"opt": {"key": torch.zeros(2, dtype=dtype)}})
        assert to_jax(torch.zeros(2)).dtype == "float32"  # 32-bit tensors still convert


def test_64_bit_tensors_are_zero_copy_with_x64_on(jax):
    key = torch.tensor([12345, 2**40], dtype=torch.int64)
    with x64(jax):
        arr = to_jax(key)
        assert arr.dtype == "int64" and arr.unsafe_buffer_pointer() == key.data_ptr()
        assert torch.equal(from_jax(arr), key)


def test_results_of_jax_computations_come_back_with_the_right_values(jax):
    jnp = jax.numpy
    got = from_jax({"t": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3).T, "n": 3})
    assert torch.equal(got["t"], torch.arange(6.0).reshape(2, 3).T) and got["n"] == 3


def test_foreign_leaves_are_rejected_with_their_path(jax):
    with pytest.raises(TypeError, match=r"to_jax: .* got str at 'a/0'"):
        to_jax({"a": ["text"]})
    with pytest.raises(TypeError, match=r"from_jax: .* got ndarray at 'a'"):
        from_jax({"a": jax.numpy.ones(2).__array__()})


def test_from_jax_inside_jit_explains_traced_values(jax):
    @jax.jit
    def f(x):
        from_jax({"x": x})
        return x

    with pytest.raises(TypeError, match="traced value"):
        f(jax.numpy.ones(2))
