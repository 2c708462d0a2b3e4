"""The speedrun's peer: the airbench94 recipe as plain ``torch.nn`` + ``torch.optim``, written the
way airbench writes it (a stateful module, the *sum* of the per-example losses, ``SGD`` parameter
groups with airbench's rates, ``LambdaLR``, ``requires_grad`` switches and an in-place lookahead),
and :func:`time_steps`, which times training steps of it and of the pure speedrun step
interleaved in one process (:func:`experiments.benchmarks.timing.interleaved`).

``reference_module(...)``'s ``state_dict()`` keys equal the pure net's ``{**params, **state}``
(:func:`nets.airbench`), so ``module.load_state_dict({**params, **state})`` starts both from the
same numbers; tests/test_speedrun.py checks that a few steps of each give the same weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..airbench.config import SpeedrunConfig
from ..airbench.recipe import param_labels
from .timing import interleaved, median

__all__ = ["reference_module", "ReferenceRun", "time_steps"]


class Mul(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def _dirac_(conv: nn.Conv2d) -> nn.Conv2d:
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    w = conv.weight.data
    nn.init.dirac_(w[:w.size(1)])
    return conv


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int, activation, momentum: float, eps: float):
        super().__init__()
        self.conv1 = _dirac_(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(c_out, eps=eps, momentum=momentum)
        self.activ1 = activation()
        self.conv2 = _dirac_(nn.Conv2d(c_out, c_out, 3, padding=1, bias=False))
        self.norm2 = nn.BatchNorm2d(c_out, eps=eps, momentum=momentum)
        self.activ2 = activation()

    def forward(self, x):
        x = self.activ1(self.norm1(self.pool(self.conv1(x))))
        return self.activ2(self.norm2(self.conv2(x)))


def reference_module(cfg: SpeedrunConfig, whiten: torch.Tensor | None = None,
                     num_classes: int = 10) -> nn.Sequential:
    """airbench's ``make_net`` for the recipe ``cfg`` (widths, activation, batch-norm settings,
    scale); layer 0's weight is ``whiten`` when given. Every parameter trains (``requires_grad``);
    :class:`ReferenceRun` switches off what the recipe freezes."""
    act = {"gelu": nn.GELU, "relu": nn.ReLU}[cfg.activation]
    widths = list(cfg.widths)
    net = nn.Sequential(_dirac_(nn.Conv2d(3, 24, 2, padding=0, bias=True)), act(),
                        ConvGroup(24, widths[0], act, cfg.bn_momentum, cfg.bn_eps),
                        ConvGroup(widths[0], widths[1], act, cfg.bn_momentum, cfg.bn_eps),
                        ConvGroup(widths[1], widths[2], act, cfg.bn_momentum, cfg.bn_eps),
                        nn.MaxPool2d(3), nn.Flatten(), nn.Linear(widths[2], num_classes, bias=False),
                        Mul(cfg.scale))
    if whiten is not None:
        with torch.no_grad():
            net[0].weight.copy_(whiten)
    return net


class LookaheadState:
    """airbench's: ``ema.lerp_(net, 1 - decay); net.copy_(ema)`` over the floating state_dict."""

    def __init__(self, net: nn.Module):
        self.net_ema = {k: v.clone() for k, v in net.state_dict().items()}

    def update(self, net: nn.Module, decay: float):
        for ema, cur in zip(self.net_ema.values(), net.state_dict().values()):
            if cur.dtype in (torch.half, torch.bfloat16, torch.float, torch.double):
                ema.lerp_(cur, 1 - decay)
                cur.copy_(ema)


class ReferenceRun:
    """The recipe's training state as airbench keeps it; :meth:`step` is one training step.

    ``SGD(momentum, nesterov)`` with the groups of ``recipe.param_labels`` (frozen parameters get
    ``requires_grad=False`` and no group), each at airbench's ``lr / s`` (``s = 1024 (1 + 1 / (1 -
    momentum))``, times ``bias_scaler`` for the batch-norm biases) and ``weight_decay =
    wd B / s / lr_group``, on the *sum* of the per-example losses; ``LambdaLR`` with the
    triangular factor; the whitening bias's ``requires_grad`` on for the first
    ``whiten_bias_epochs`` epochs; the lookahead every ``lookahead_every`` steps.
    """

    def __init__(self, module: nn.Module, cfg: SpeedrunConfig, steps_per_epoch: int, *,
                 bf16: bool = False, channels_last: bool = False):
        self.module, self.cfg = module, cfg
        self.bf16, self.channels_last = bf16, channels_last
        self.total = cfg.epochs * steps_per_epoch
        self.steps_per_epoch = steps_per_epoch
        self.count = 0
        labels = param_labels(cfg)(dict(module.named_parameters()))
        s = 1024 * (1 + 1 / (1 - cfg.momentum))
        lr = cfg.lr / s
        wd = cfg.weight_decay * cfg.batch_size / s
        groups = {"other": [], "whiten_bias": [], "norm_bias": []}
        for name, p in module.named_parameters():
            p.requires_grad_(labels[name] != "frozen")
            if labels[name] != "frozen":
                groups[labels[name]].append(p)
        lr_bias = lr * cfg.bias_scaler
        self.opt = torch.optim.SGD(
            [dict(params=groups["other"] + groups["whiten_bias"], lr=lr, weight_decay=wd / lr),
             dict(params=groups["norm_bias"], lr=lr_bias, weight_decay=wd / lr_bias)],
            momentum=cfg.momentum, nesterov=bool(cfg.nesterov))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._factor)
        self.whiten_bias = groups["whiten_bias"]
        self.lookahead = LookaheadState(module) if cfg.lookahead else None
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)

    def _factor(self, step: int) -> float:
        c = self.cfg
        if c.schedule == "constant":
            return 1.0
        w = int(self.total * c.peak_fraction)
        if step < w:
            frac = step / w
            return c.start_factor * (1 - frac) + 1.0 * frac
        frac = (min(step, self.total) - w) / (self.total - w)
        return 1.0 * (1 - frac) + c.end_factor * frac

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step on the normalised batch ``x``; returns the summed loss (detached)."""
        epoch = self.count // self.steps_per_epoch
        for p in self.whiten_bias:
            p.requires_grad_(epoch < self.cfg.whiten_bias_epochs)
        self.module.train()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.module(x)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing,
                               reduction="none").sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.count += 1
        if self.lookahead is not None:
            if self.count % self.cfg.lookahead_every == 0:
                decay = self.cfg.lookahead_decay * (self.count / self.total) ** 3
                self.lookahead.update(self.module, decay)
            if self.count >= self.total:
                self.lookahead.update(self.module, 1.0)
        return loss.detach()


def time_steps(cfg: SpeedrunConfig, steps: int, rounds: int = 3, *, device: str = "cpu",
               seed: int = 0) -> dict:
    """Seconds per training step of the pure speedrun step and of :class:`ReferenceRun`, at
    ``cfg``'s batch size, bf16 and channels_last, on random images, interleaved: each round runs
    ``steps`` steps of one, then of the other (:func:`~experiments.benchmarks.timing.interleaved`),
    after one untimed warm-up step each. Both include the lookahead; neither includes the data
    augmentation. Returns ``{"pure": s, "torch.nn": s, "ratio": torch.nn / pure}``
    (median seconds per step; ratio > 1: the pure step is faster)."""
    from layers import random as jr

    from ..airbench.run import parts
    from ..data.dataset import Dataset
    from ..train import make_step, to_channels_last
    from ..train.build import build_loss

    g = torch.Generator().manual_seed(seed)
    b = cfg.batch_size
    images = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g)
    train = Dataset(images, torch.randint(0, 10, (len(images),), generator=g), tuple(range(10)))
    # the schedule and the lookahead span every step timed (and the warm-up)
    steps_per_epoch = math.ceil((1 + steps * rounds) / cfg.epochs)
    net, opt, hooks = parts(cfg, train, steps_per_epoch)
    dev = torch.device(device)
    x = torch.randn(b, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (b,), generator=g).to(dev)
    bf16, cl = bool(cfg.bf16), bool(cfg.channels_last)

    params, state = net.init(jr.key(seed), device=dev)
    opt_state = opt.init(params)
    if cl:
        params, opt_state = to_channels_last(params), to_channels_last(opt_state)
    step = make_step(net, opt, build_loss(cfg), bf16=bf16, channels_last=cl)
    if hooks.wrap_step is not None:
        step = hooks.wrap_step(step)
    pure = {"params": params, "state": state, "opt_state": opt_state}
    key = jr.key(seed + 1).to(dev)

    def pure_steps(n):
        for _ in range(n):
            pure["params"], pure["state"], pure["opt_state"], _ = step(
                pure["params"], pure["state"], pure["opt_state"], (x, y), key)

    module = reference_module(cfg).to(dev)
    module.load_state_dict({**params, **state})
    ref = ReferenceRun(module, cfg, steps_per_epoch, bf16=bf16, channels_last=cl)

    def ref_steps(n):
        for _ in range(n):
            ref.step(x, y)

    pure_steps(1), ref_steps(1)          # warm-up
    times = interleaved({"pure": lambda: pure_steps(steps), "torch.nn": lambda: ref_steps(steps)},
                        rounds, dev)
    out = {name: median(ts) / steps for name, ts in times.items()}
    out["ratio"] = out["torch.nn"] / out["pure"]
    return out
