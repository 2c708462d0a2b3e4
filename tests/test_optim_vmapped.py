"""optim.vmapped's divergence test: member k is finite exactly when all its floating leaves are."""
import pytest
import torch
from torch.utils import _pytree as pytree

import optim
from optim.ensemble import FLAT, _Flat, _member_finite


def test_member_finiteness_is_exact_for_huge_values_nan_and_infinities():
    big = torch.full((4, 1000), 3e38, dtype=torch.float32)     # a float32 sum would overflow
    big[1, 7] = float("nan")
    big[2, 0], big[2, 1] = float("inf"), -float("inf")
    big[3, 5] = -float("inf")
    tree = {"w": big, "b": torch.zeros(4, dtype=torch.bfloat16), "count": torch.zeros(4, dtype=torch.int64)}
    assert _member_finite(tree, 4).tolist() == [True, False, False, False]
    tree["b"][0] = float("nan")                                  # a (K,) leaf counts too
    assert _member_finite(tree, 4).tolist() == [False, False, False, False]


def test_a_member_with_nan_gradients_is_frozen_and_the_others_step():
    opt = optim.vmapped(lambda lr: optim.sgd(lr, momentum=0.9), lr=torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64))
    params = {"w": torch.ones(3, 2, 2)}
    state = opt.init(params)
    grads = {"w": torch.ones(3, 2, 2)}
    grads["w"][1, 0, 1] = float("nan")
    new, state = optim.step(opt, grads, state, params)
    assert state.diverged.tolist() == [False, True, False]
    assert torch.equal(new["w"][1], params["w"][1])
    torch.testing.assert_close(new["w"][[0, 2]], torch.full((2, 2, 2), 0.9))
    new2, state = optim.step(opt, {"w": torch.ones(3, 2, 2)}, state, new)   # frozen for good
    assert torch.equal(new2["w"][1], params["w"][1]) and state.diverged.tolist() == [False, True, False]


def test_member_lrs_is_each_members_scheduled_rate_for_its_next_update():
    opt = optim.vmapped(lambda lr: optim.sgd(optim.step_decay_schedule(lr, 1, 0.5), momentum=0.9),
                        lr=torch.tensor([0.1, 0.01], dtype=torch.float64))
    params = {"w": torch.ones(2, 3)}
    state = opt.init(params)
    assert torch.equal(optim.member_lrs(state), torch.tensor([0.1, 0.01], dtype=torch.float64))
    params, state = optim.step(opt, {"w": torch.ones(2, 3)}, state, params)
    assert torch.equal(optim.member_lrs(state), torch.tensor([0.05, 0.005], dtype=torch.float64))
    clip = optim.vmapped(lambda c: optim.clip_by_global_norm(1.0), c=torch.tensor([1.0, 2.0]))
    assert optim.member_lrs(clip.init(params)) is None   # no stage with a rate


def test_member_finiteness_skips_non_tensor_and_integer_leaves():
    tree = {"n": 3, "none": None, "count": torch.zeros(2, dtype=torch.int64), "empty": torch.zeros(2, 0)}
    assert _member_finite(tree, 2).tolist() == [True, True]
    tree["w"] = torch.tensor([[1.0, float("inf")], [2.0, 3.0]])
    assert _member_finite(tree, 2).tolist() == [False, True]


def test_vmapped_refusals_name_the_stage_and_what_was_expected():
    with pytest.raises(ValueError, match=r"^vmapped: expected at least one hyperparameter \(K,\) tensor, got none$"):
        optim.vmapped(lambda: optim.sgd(0.1))
    opt = optim.vmapped(lambda lr: optim.sgd(lr), lr=torch.tensor([0.1, 0.2]))
    params = {"w": torch.ones(2, 3)}
    with pytest.raises(TypeError, match=r"^vmapped.update: expected a VmappedState \(from vmapped\(...\).init\), "
                                        r"got dict$"):
        opt.update({"w": torch.ones(2, 3)}, {}, params)
    with pytest.raises(ValueError, match=r"^vmapped.update: expected params, got None$"):
        opt.update({"w": torch.ones(2, 3)}, opt.init(params), None)
    with pytest.raises(ValueError, match=r"^vmapped.update: updates and params differ at 'w': missing in updates"):
        opt.update({"v": torch.ones(2, 3)}, opt.init(params), params)


def test_a_member_with_a_nan_gradient_diverges_even_where_its_step_ignores_that_leaf():
    # "gradients or new parameters": a frozen leaf's NaN gradient leaves the parameters finite,
    # and the member is still marked diverged and keeps its old values.
    opt = optim.vmapped(lambda lr: optim.freeze(optim.sgd(lr), lambda q: {k: k == "b" for k in q}),
                        lr=torch.tensor([0.1, 0.2]))
    params = {"w": torch.ones(2, 3), "b": torch.ones(2, 3)}
    grads = {"w": torch.ones(2, 3), "b": torch.ones(2, 3)}
    grads["b"][1, 0] = float("nan")
    new, state = optim.step(opt, grads, opt.init(params), params)
    assert state.diverged.tolist() == [False, True]
    assert torch.equal(new["w"][1], params["w"][1])
    torch.testing.assert_close(new["w"][0], torch.full((3,), 0.9))


def test_one_member_is_the_members_own_optimizer_on_its_tree():
    opt = optim.vmapped(lambda lr, momentum: optim.sgd(lr, momentum=momentum, nesterov=True),
                        lr=torch.tensor([0.1], dtype=torch.float64), momentum=torch.tensor([0.9], dtype=torch.float64))
    own = optim.sgd(0.1, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(1, 3, 2, generator=g, dtype=torch.float64)}
    state, own_params = opt.init(params), {"w": params["w"][0].clone()}
    own_state = own.init(own_params)
    for _ in range(3):
        grads = {"w": torch.randn(1, 3, 2, generator=g, dtype=torch.float64)}
        params, state = optim.step(opt, grads, state, params)
        own_params, own_state = optim.step(own, {"w": grads["w"][0]}, own_state, own_params)
        assert params["w"].shape == (1, 3, 2) and torch.equal(params["w"][0], own_params["w"])


def test_flat_runs_the_members_on_one_buffer_and_gives_the_leaf_by_leaf_values():
    def run(flat):
        opt = optim.vmapped(lambda lr: optim.sgd(lr, momentum=0.9, weight_decay=1e-2), flat=flat,
                            lr=torch.tensor([0.1, 0.2], dtype=torch.float64))
        g = torch.Generator().manual_seed(1)
        params = {"w": torch.randn(2, 3, 2, generator=g), "b": torch.randn(2, 3, generator=g)}
        state = opt.init(params)
        for _ in range(3):
            grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
            params, state = optim.step(opt, grads, state, params)
        return params, state

    (flat_p, flat_s), (leaf_p, leaf_s) = run(True), run(False)
    base = flat_p["w"]._base
    assert base is not None and base.shape == (2, 9) and flat_p["b"]._base is base   # views of one (K, P) buffer
    assert leaf_p["w"]._base is None or leaf_p["w"]._base is not leaf_p["b"]._base
    for k in leaf_p:
        torch.testing.assert_close(flat_p[k], leaf_p[k], rtol=1e-6, atol=1e-7)
    assert type(flat_s.inner) is type(leaf_s.inner)   # the state keeps its structure
    for a, b in zip(torch.utils._pytree.tree_leaves(flat_s.inner), torch.utils._pytree.tree_leaves(leaf_s.inner)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flat", [False, True])
def test_update_is_the_new_parameters_minus_the_old_and_step_applies_it(flat):
    make = lambda: optim.vmapped(lambda lr: optim.sgd(lr, momentum=0.9), flat=flat,   # noqa: E731
                                 lr=torch.tensor([0.1, 0.3], dtype=torch.float64))
    g = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(2, 3, 2, generator=g, dtype=torch.float64),
              "b": torch.randn(2, 3, generator=g, dtype=torch.float64)}
    grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    opt_u, opt_s = make(), make()
    updates, state_u = opt_u.update(grads, opt_u.init(params), params)
    new, state_s = optim.step(opt_s, grads, opt_s.init(params), params)
    assert updates.keys() == params.keys()
    for k in params:
        torch.testing.assert_close(optim.apply_updates(params, updates)[k], new[k], rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(updates[k], new[k] - params[k], rtol=0, atol=0)
    assert state_u.diverged.tolist() == state_s.diverged.tolist() == [False, False]


def test_a_member_whose_new_parameters_overflow_diverges_though_its_gradients_are_finite():
    opt = optim.vmapped(lambda lr: optim.sgd(lr), lr=torch.tensor([0.1, float("inf")], dtype=torch.float64))
    params = {"w": torch.ones(2, 3, dtype=torch.float64)}
    new, state = optim.step(opt, {"w": torch.ones(2, 3, dtype=torch.float64)}, opt.init(params), params)
    assert state.diverged.tolist() == [False, True]
    assert torch.equal(new["w"][1], params["w"][1])


def test_members_step_leaf_by_leaf_unless_flat_is_asked_for():
    opt = optim.vmapped(lambda lr: optim.sgd(lr, momentum=0.9), lr=torch.tensor([0.1, 0.2], dtype=torch.float64))
    params = {"w": torch.ones(2, 3, 2), "b": torch.zeros(2, 3)}
    new, _ = optim.step(opt, {"w": torch.ones(2, 3, 2), "b": torch.ones(2, 3)}, opt.init(params), params)
    assert new["w"]._base is None or new["w"]._base is not new["b"]._base


def test_vmapped_refuses_hyperparameters_that_are_not_k_vectors_of_one_length():
    make = lambda **h: optim.sgd(0.1)   # noqa: E731
    for h in ({"lr": 0.1}, {"lr": torch.ones(2, 2)}, {"lr": torch.ones(2), "momentum": torch.ones(3)}):
        with pytest.raises(ValueError, match=r"^vmapped: expected \(K,\) tensors of one length K, got shapes"):
            optim.vmapped(make, **h)


def test_member_finiteness_stays_on_the_leaves_device():
    tree = {"w": torch.zeros(2, 3, device="meta"), "b": torch.zeros(2, device="meta", dtype=torch.float64)}
    assert _member_finite(tree, 2).device.type == "meta"


# ---- the flat layout (vmapped(..., flat=True)): the same bits as leaf by leaf, for any tree ----

def _sgd(lr):
    return optim.sgd(lr, momentum=0.9, weight_decay=1e-2)


def _run(params, flat, k, steps=3, make=_sgd):
    """``steps`` vmapped steps from ``params`` (cloned) with member rates 0.1, 0.2, ...; the last
    parameters and state."""
    opt = optim.vmapped(make, flat=flat, lr=torch.arange(1, k + 1, dtype=torch.float64) / 10)
    params = pytree.tree_map(torch.clone, params)
    state = opt.init(params)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        grads = pytree.tree_map(lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype), params)
        params, state = optim.step(opt, grads, state, params)
    return params, state


def _assert_same_bits(a, b):
    assert pytree.tree_structure(a) == pytree.tree_structure(b)
    for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


FLAT_TREES = {   # member dimension first (k); leaf shapes and dtypes the layout must keep apart
    "one leaf": lambda k: {"w": torch.randn(k, 3, 2)},
    "a tuple of three leaves": lambda k: (torch.randn(k, 3, 2), torch.randn(k, 3), torch.randn(k)),
    "leaves of every rank": lambda k: {"w": torch.randn(k, 2, 3, 2), "b": torch.randn(k, 3), "s": torch.randn(k)},
    "two dtypes": lambda k: {"w": torch.randn(k, 3, 2), "b": torch.randn(k, 3, dtype=torch.float64)},
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("tree", sorted(FLAT_TREES))
def test_flat_gives_the_leaf_by_leaf_bits_and_dtypes_for_any_tree_of_member_leaves(tree, k):
    # sgd with momentum and weight decay runs the same elementwise ops on the buffer as on each
    # leaf: bit for bit (the vmapped docstring). A tuple of three is the shape of the (updates,
    # state, params) triple the layout packs: only the params-shaped parts become buffers.
    torch.manual_seed(0)
    params = FLAT_TREES[tree](k)
    (flat_p, flat_s), (leaf_p, leaf_s) = _run(params, True, k), _run(params, False, k)
    _assert_same_bits(flat_p, leaf_p)
    _assert_same_bits(flat_s, leaf_s)
    leaves = pytree.tree_leaves(flat_p)
    if tree == "two dtypes":   # one buffer holds one dtype: these step leaf by leaf
        assert leaves[0]._base is None or leaves[1]._base is not leaves[0]._base
    else:                      # every leaf, (k,) ones too, is a view of one buffer of k P elements
        base = leaves[0]._base
        assert base is not None and base.numel() == k * sum(x[0].numel() for x in leaves)
        assert all(x._base is base for x in leaves)


@pytest.mark.parametrize("k", [1, 2])
def test_a_flat_step_packs_the_buffer_the_last_one_laid_out_without_a_copy(k):
    # The docstring's promise ("the next step finds its parameters and state already laid out
    # (no copy)"): packing the last step's parameters returns their buffer itself. Three leaves
    # of three ranks, so each leaf's offset in the buffer is checked.
    torch.manual_seed(0)
    params, _ = _run({"w": torch.randn(k, 2, 3), "b": torch.randn(k, 3), "s": torch.randn(k)}, True, k, steps=2)
    buffer = pytree.tree_leaves(params)[0]._base
    packed = _Flat(params, k).pack(params)
    assert set(packed) == {FLAT} and packed[FLAT].data_ptr() == buffer.data_ptr()
    assert packed[FLAT].shape == (k, 10) and torch.equal(packed[FLAT], buffer.view(k, 10))
    # one fresh leaf needs no concatenation: its buffer is the leaf itself, reshaped
    one = {"w": torch.randn(k, 2, 3)}
    assert _Flat(one, k).pack(one)[FLAT].data_ptr() == one["w"].data_ptr()


def _views(kind):
    """Parameters w (2, 3, 2) and b (2, 3) of two members whose storage is not the layout's
    (2, 9) buffer of [w_k, b_k] rows, though it comes close."""
    g = torch.Generator().manual_seed(3)
    if kind == "one buffer, leaves in the other order":
        buf = torch.randn(2, 9, generator=g)
        return {"w": buf[:, 3:].view(2, 3, 2), "b": buf[:, :3]}
    if kind == "the first rows of a larger buffer":
        buf = torch.randn(3, 9, generator=g)
        return {"w": buf[:2, :6].view(2, 3, 2), "b": buf[:2, 6:]}
    if kind == "one buffer, members apart":   # [w_0, b_0, b_1, w_1]: the right offsets, not strides
        buf = torch.randn(18, generator=g)
        return {"w": buf.as_strided((2, 3, 2), (12, 2, 1), 0), "b": buf.as_strided((2, 3), (3, 1), 6)}
    if kind == "two buffers":                  # each leaf where the layout would put it
        a, b = torch.randn(2, 9, generator=g), torch.randn(2, 9, generator=g)
        return {"w": a[:, :6].view(2, 3, 2), "b": b[:, 6:]}
    raise AssertionError(kind)


def _run_once_leaf_by_leaf(params, grads):
    opt = optim.vmapped(_sgd, lr=torch.tensor([0.1, 0.2], dtype=torch.float64))
    params = {n: t.clone() for n, t in params.items()}
    return optim.step(opt, grads, opt.init(params), params)


@pytest.mark.parametrize("kind", ["one buffer, leaves in the other order", "the first rows of a larger buffer",
                                  "one buffer, members apart", "two buffers"])
def test_flat_gives_the_leaf_by_leaf_bits_for_parameters_that_are_views_of_other_storage(kind):
    # Only a tree laid out exactly as the layout's buffer is taken as it is; any other storage is
    # copied into a new buffer, so the values stepped are the parameters' own.
    params = _views(kind)
    opt = optim.vmapped(_sgd, flat=True, lr=torch.tensor([0.1, 0.2], dtype=torch.float64))
    grads = {"w": torch.ones(2, 3, 2), "b": torch.ones(2, 3)}
    flat_p, flat_s = optim.step(opt, grads, opt.init(params), params)
    _assert_same_bits((flat_p, flat_s), _run_once_leaf_by_leaf(params, grads))


BAD_PARAMS = {   # params unlike those the state was made for
    "a 0-d leaf": {"w": torch.ones(2, 3), "b": torch.tensor(1.0)},
    "four members": {"w": torch.ones(4, 3), "b": torch.ones(4)},
    "a 0-d tensor": torch.tensor(1.0),
}


@pytest.mark.parametrize("bad", sorted(BAD_PARAMS))
def test_a_flat_step_refuses_what_a_leaf_by_leaf_step_refuses_with_the_same_error(bad):
    # flat only changes the layout: a tree it cannot lay out is left to the leaf-by-leaf step,
    # whose refusal (vmap's) is the one the caller sees, never an error of the layout's own.
    params = BAD_PARAMS[bad]
    errors = []
    for flat in (False, True):
        opt = optim.vmapped(lambda lr: optim.sgd(lr), flat=flat, lr=torch.tensor([0.1, 0.2]))
        state = opt.init({"w": torch.ones(2, 3), "b": torch.ones(2)})
        with pytest.raises(ValueError) as e:
            optim.step(opt, pytree.tree_map(torch.ones_like, params), state, params)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "vmap" in errors[0]


def _counting():
    """A user's stage (only init and update) whose state is a dict of its own: the steps taken."""
    return optim.GradientTransformation(lambda params: {"steps": torch.zeros((), dtype=torch.int64)},
                                        lambda updates, state, params=None: (updates, {"steps": state["steps"] + 1}))


def test_flat_keeps_the_state_that_is_not_shaped_like_the_parameters():
    # Only the subtrees shaped like the parameters are laid out; the rest (here a dict of another
    # shape) goes through the step as it is and comes back as the step made it.
    torch.manual_seed(0)
    params = {"w": torch.randn(2, 3, 2), "b": torch.randn(2, 3)}
    make = lambda lr: optim.chain(_counting(), _sgd(lr))   # noqa: E731
    (flat_p, flat_s), (leaf_p, leaf_s) = _run(params, True, 2, make=make), _run(params, False, 2, make=make)
    assert flat_s.inner[0]["steps"].tolist() == [3, 3]
    _assert_same_bits((flat_p, flat_s), (leaf_p, leaf_s))


def test_a_donated_vmapped_update_hands_on_its_updates_as_temporaries_of_the_step():
    # new - old is computed by the step itself, so the next stage of a chain may write into it
    # (donated_update's third result; what lets optim.chain skip a copy)
    opt = optim.vmapped(lambda lr: optim.sgd(lr, momentum=0.9), lr=torch.tensor([0.1, 0.2], dtype=torch.float64))
    params = {"w": torch.ones(2, 3)}
    grads = {"w": torch.full((2, 3), 0.5)}
    updates, _, owned = opt.donated_update(grads, opt.init(params), params, False)
    assert owned is True
    assert not any(updates["w"].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                   for x in (params["w"], grads["w"]))


@pytest.mark.parametrize("flat", [False, True])
def test_a_step_where_every_member_is_finite_skips_the_freezing_pass(flat):
    # the freeze is one torch.where per leaf of the parameters and the state: the usual step
    # (every member finite) runs none; plain sgd itself runs no where at all
    from torch.utils._python_dispatch import TorchDispatchMode

    class Wheres(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.where.self
            return func(*args, **(kwargs or {}))

    opt = optim.vmapped(lambda lr: optim.sgd(lr), flat=flat, lr=torch.tensor([0.1, 0.2], dtype=torch.float64))
    params = {"w": torch.ones(2, 3, 2), "b": torch.zeros(2, 3)}
    state = opt.init(params)
    grads = {"w": torch.ones(2, 3, 2), "b": torch.ones(2, 3)}
    with Wheres() as finite:
        optim.step(opt, grads, state, params)
    grads["w"][1, 0, 0] = float("nan")
    with Wheres() as diverging:
        optim.step(opt, grads, state, params)
    assert finite.count == 0 and diverging.count > 0


@pytest.mark.parametrize("make", [lambda lr: optim.sgd(lr), lambda lr: optim.sgd(lr, momentum=0.9, nesterov=True),
                                  lambda lr: optim.adamw(lr)], ids=["sgd", "sgd nesterov", "adamw"])
@pytest.mark.parametrize("flat", [False, True])
def test_a_compiled_step_keeps_the_divergence_flags_on_the_host_and_the_rest_on_the_parameters_device(flat, make, monkeypatch):
    # torch.compile traces the step with fake tensors and is_compiling() True (no host read: the
    # freeze always runs). Traced so here, with fake CUDA tensors, a CPU-only machine checks the
    # device moves of a GPU run: `diverged` is made by init on the host, the members' flags on
    # the parameters' device, and the freeze meets state leaves on both (sgd's counter is a host
    # tensor).
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with FakeTensorMode():
        cuda = torch.device("cuda", 0)
        opt = optim.vmapped(make, flat=flat,
                            lr=torch.tensor([0.1, 0.2], dtype=torch.float64, device=cuda))
        params = {"w": torch.ones(2, 3, 2, device=cuda), "b": torch.zeros(2, 3, device=cuda)}
        state = opt.init(params)
        inner_devices = [x.device for x in pytree.tree_leaves(state.inner)]
        assert state.diverged.device.type == "cpu" and set(inner_devices) == {torch.device("cpu"), cuda}
        for _ in range(2):
            params, state = optim.step(opt, {k: torch.ones_like(v) for k, v in params.items()}, state, params)
    assert all(x.device == cuda for x in params.values()) and state.diverged.device.type == "cpu"
    assert [x.device for x in pytree.tree_leaves(state.inner)] == inner_devices
