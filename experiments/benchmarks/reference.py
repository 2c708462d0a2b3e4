"""The baseline of the speed benchmark: the torch.nn + torch.optim loop a user would otherwise write.

``reference_module(model, net_kwargs)`` builds Model A, B or C as a plain ``nn.Sequential`` whose
``state_dict()`` keys equal the keys of the pure net's ``{**params, **state}``, so
``module.load_state_dict({**params, **state})`` starts both from the same numbers.
:class:`ReferenceLoop` is the classic stateful step::

    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(x), y, label_smoothing=s)
    loss.backward()
    opt.step()            # torch.optim.SGD(nesterov, momentum, weight_decay), foreach default

with the speed tricks of the pure step available to it too (channels_last, bf16 autocast,
torch.compile), so that the benchmark compares with the strongest torch.nn peer.

These twins are written from the architecture descriptions in ``nets/model_a.py`` and
``nets/model_b.py`` / ``nets/model_c.py`` (the test suite keeps its own independent twins in tests/reference_modules.py).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["reference_module", "tutorial_module", "ReferenceLoop", "MODEL_BLOCKS"]

# Conv widths of the VGG-like blocks of Models B and C (as MODEL_B_BLOCKS / MODEL_C_BLOCKS in nets/model_b.py, nets/model_c.py).
MODEL_BLOCKS = {"b": ((64, 64), (128, 128), (256, 256)),
                "c": ((64, 64), (128, 128, 128), (256, 256, 256))}


def _model_a(num_classes: int) -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 8 * 8, 256), nn.ReLU(),
                               nn.Linear(256, num_classes))
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))


class _Tutorial(nn.Module):
    """The PyTorch CIFAR-10 tutorial's ``Net`` as the tutorial writes it (one pool used twice)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.pool, self.conv2 = nn.Conv2d(3, 6, 5), nn.MaxPool2d(2, 2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def tutorial_module(num_classes: int = 10) -> nn.Module:
    """The tutorial net as torch.nn writes it; its ``state_dict()`` keys are ``nets.tutorial_net``'s."""
    return _Tutorial(num_classes)


def _vgg_like(blocks, num_classes: int, dropout: float, head_dropout: float) -> nn.Module:
    body, channels = [], 3
    for widths in blocks:
        for width in widths:
            body += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                     nn.ReLU()]
            channels = width
        body += [nn.MaxPool2d(2), nn.Dropout(dropout)]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(head_dropout),
                               nn.Linear(channels, num_classes))
    return nn.Sequential(OrderedDict(features=nn.Sequential(*body), classifier=classifier))


def reference_module(model: str, *, num_classes: int = 10, dropout: float = 0.1,
                     head_dropout: float = 0.2) -> nn.Module:
    """``nn.Sequential`` twin of ``nets.model_a()`` (``model="a"``), ``model_b`` or ``model_c``, or
    the tutorial net as the PyTorch tutorial writes it (``model="tutorial"``).

    ``dropout`` / ``head_dropout`` apply to B and C (A has none). Input ``(N, 3, 32, 32)``,
    output ``(N, num_classes)``.
    """
    if model == "a":
        return _model_a(num_classes)
    if model == "tutorial":
        return tutorial_module(num_classes)
    if model in MODEL_BLOCKS:
        return _vgg_like(MODEL_BLOCKS[model], num_classes, dropout, head_dropout)
    raise ValueError(f"reference_module: expected model 'a', 'b', 'c' or 'tutorial', got {model!r}")


class ReferenceLoop:
    """The stateful torch.nn + torch.optim training step, for timing against the pure step.

    ``loop.step(x, y) -> loss`` (a 0-d tensor, detached) runs zero_grad, forward, cross-entropy
    with label smoothing, backward and ``SGD.step`` on ``module`` in place.

    The same speed options as the pure step, the way a torch.nn user applies them:
    ``channels_last`` (``module.to(memory_format=torch.channels_last)`` and channels-last
    inputs), ``bf16`` (the forward under ``torch.autocast(bfloat16)``, the loss in float32) and
    ``compile`` (``torch.compile(module)``; the optimizer step stays eager, as in the pure step).
    """

    def __init__(self, module: nn.Module, tree: Mapping[str, torch.Tensor], *, lr: float,
                 momentum: float, weight_decay: float, label_smoothing: float,
                 device: torch.device | str = "cpu", channels_last: bool = False,
                 bf16: bool = False, compile: bool = False):
        module.load_state_dict(dict(tree))
        self.module = module.to(device).train()
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.device = torch.device(device)
        self.channels_last, self.bf16 = channels_last, bf16
        self.forward = torch.compile(self.module) if compile else self.module
        self.label_smoothing = label_smoothing
        self.opt = torch.optim.SGD(self.module.parameters(), lr=lr, momentum=momentum,
                                   nesterov=True, weight_decay=weight_decay)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step on the batch ``x (N, 3, H, W)``, ``y (N,)``; returns the loss."""
        self.opt.zero_grad(set_to_none=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)
        if logits.dtype in (torch.bfloat16, torch.float16):   # the loss in float32, as the pure step
            logits = logits.float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        loss.backward()
        self.opt.step()
        return loss.detach()
