"""optim.vmapped's divergence test: member k is finite exactly when all its floating leaves are."""
import pytest
import torch

import optim
from optim.ensemble import _member_finite


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
