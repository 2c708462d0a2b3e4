"""optim.vmapped's divergence test: member k is finite exactly when all its floating leaves are."""
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
