"""optim.testing catches what it is for: a planted optimizer bug fails the twin trajectory."""
import pytest
import torch
from hypothesis import strategies as st

import optim
from optim.testing import check_optimizer, check_tensor_hyperparameters


def test_a_momentum_that_ignores_dampening_fails_the_twin_trajectory():
    hyper = st.fixed_dictionaries(dict(lr=st.just(0.1), momentum=st.just(0.9), dampening=st.just(0.5)))
    with pytest.raises(AssertionError, match=r"step \d+"):
        check_optimizer(lambda lr, mask, momentum, dampening: optim.sgd(lr, momentum=momentum),
                        lambda groups, lr, **hp: torch.optim.SGD(groups, lr=lr, foreach=True, **hp),
                        hyper, max_examples=2, steps=3, shrink=False)   # (shrinking trees: 30 s)


def test_a_tensor_path_one_rounding_off_fails_the_same_bits_check():
    def make(lr):      # the tensor path computes lr * (1 + 1e-16): a last bit away, or not at all
        return optim.sgd(lr * (1 + 2**-40) if isinstance(lr, torch.Tensor) else lr)

    with pytest.raises(AssertionError, match="other bits than the Python numbers"):
        check_tensor_hyperparameters(make, st.tuples(st.floats(0.01, 0.5)), max_examples=3,
                                     shrink=False)
