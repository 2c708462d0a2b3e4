"""nets.testing catches what it is for: a net whose names or batch-norm state differ from its twin."""
import pytest
import torch

import nets
import reference_modules as R
from nets.testing import check_net


def test_a_twin_with_another_layer_order_fails_the_name_check():
    with pytest.raises(AssertionError, match="names and shapes differ from the twin's state_dict"):
        check_net(lambda: nets.model_b(dropout=0.0, head_dropout=0.0), R.model_a_module, (3, 32, 32))


def _tiny_net():
    from nets.compose import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, ReLU, as_net, serial
    return as_net(serial(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), AdaptiveAvgPool2d(1),
                         Flatten(), Linear(4, 5)), name="tiny")


def _tiny_twin(momentum=0.1):
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def test_a_twin_with_another_batch_norm_momentum_fails_the_state_check():
    check_net(_tiny_net, _tiny_twin, (3, 6, 6), num_classes=5, max_examples=2)
    with pytest.raises(AssertionError, match=r"train: state 1\.running_mean"):
        check_net(_tiny_net, lambda: _tiny_twin(momentum=0.2), (3, 6, 6), num_classes=5, max_examples=2,
                  batch_sizes=(2,), train=(True,))
