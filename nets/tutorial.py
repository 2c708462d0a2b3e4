"""The PyTorch CIFAR-10 tutorial net: where the report's Model A study started (its learning-rate
and momentum sweeps, "a maximum of about 63%").

    conv1  Conv2d(3, 6, 5)    -> ReLU -> MaxPool2d(2)      (N, 3, 32, 32) -> (N, 6, 14, 14)
    conv2  Conv2d(6, 16, 5)   -> ReLU -> MaxPool2d(2)                      -> (N, 16, 5, 5)
    flatten                                                                  -> (N, 400)
    fc1    Linear(400, 120)   -> ReLU
    fc2    Linear(120, 84)    -> ReLU
    fc3    Linear(84, num_classes)                                           -> (N, num_classes)

Parameter names are the tutorial module's ``state_dict()`` keys (``conv1.weight``, ``fc3.bias``,
...); its ``pool`` is one module used twice and holds nothing, so the two pools here are named
``pool1`` and ``pool2`` and the ReLUs ``relu1`` ... ``relu4`` without changing any key. torch's
default initialisation, no batch norm, no dropout: training needs no key.
"""
from layers import _checks as C

from .compose import Conv2d, Flatten, Linear, MaxPool2d, Net, ReLU, as_net, serial

__all__ = ["tutorial_net"]


def tutorial_net(num_classes: int = 10, *, in_channels: int = 3) -> Net:
    """The tutorial net (module docstring); input ``(N, in_channels, 32, 32)``."""
    C.check_positive_int(num_classes, "tutorial_net", "num_classes")
    return as_net(serial(
        conv1=Conv2d(in_channels, 6, 5), relu1=ReLU(), pool1=MaxPool2d(2),
        conv2=Conv2d(6, 16, 5), relu2=ReLU(), pool2=MaxPool2d(2),
        flatten=Flatten(),
        fc1=Linear(16 * 5 * 5, 120), relu3=ReLU(),
        fc2=Linear(120, 84), relu4=ReLU(),
        fc3=Linear(84, num_classes)), name="tutorial_net")
