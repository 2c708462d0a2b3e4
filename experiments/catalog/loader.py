"""The one run loader: a net, its arrays and its evaluation views rebuilt from any run folder.

    run = load_trained("runs/cifar_model_b-fast-s0")      # or a checkpoint file, or a VGG16 .pth
    run.what                        # "a CIFAR run of cifar_model_b", "an ensemble of 4 members (a sweep)"
    views = run.views(tta_flip=None, tta_shift=1)          # the config's views, these laid over
    predict, params, state = run.predictor(views, device)  # ready for train.metrics.evaluate
    run.single("visualize")         # the run itself, or a one-line refusal for an ensemble

A run folder's config says which study wrote it (:mod:`experiments.catalog.kinds`); the net is
``train.registry.build_net(model, num_classes, config.net_options())`` with ``num_classes`` read
from the checkpoint's last linear layer, and an ensemble's K members are one
``nets.ensemble(net, K)`` over the stacked arrays (leaves ``(K, ...)``). A checkpoint whose config
names no model (a tree of ``nets.save``) needs ``model``; torchvision's VGG16 ``.pth`` is VGG16.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

import nets

from ..common.settings import Settings
from ..train.registry import NET_BUILDERS, build_net, num_classes_of
from ..train.runs import CHECKPOINT, check_finite, checkpoint_path, load_run
from ..train.step import make_eval, to_channels_last
from .kinds import BARE, RunKind, kind_of, read_config

__all__ = ["Views", "TrainedRun", "WrongRunError", "load_trained", "feature_layers", "shown"]


class WrongRunError(ValueError):
    """A run a command cannot read the way it was asked to (one line saying what the run is)."""


class Views(NamedTuple):
    """How a net is evaluated: test-time augmentation (:func:`experiments.train.step.make_eval`)
    and the speed options the run trained with."""

    tta_flip: bool = False
    tta_shift: int = 0
    shift_weight: float | None = None
    bf16: bool = False
    channels_last: bool = False

    def describe(self) -> str:
        """``"tta_flip=True, tta_shift=1, tta_shift_weight=0.5"`` (the weight only when shifted)."""
        weight = (f", tta_shift_weight={self.shift_weight:g}"
                  if self.tta_shift and self.shift_weight is not None else "")
        return f"tta_flip={self.tta_flip}, tta_shift={self.tta_shift}{weight}"


@dataclass(frozen=True)
class TrainedRun:
    """A checkpoint made ready to use (:func:`load_trained`).

    ``net`` is one member's net; ``params`` / ``state`` are as stored: for an ensemble of
    ``members`` K, every leaf is ``(K, ...)`` (:func:`nets.stack`). ``config`` is the run's typed
    config (None for a bare checkpoint); ``progress`` its stored progress (``epoch`` completed).
    """

    path: Path
    kind: RunKind
    config: Settings | None
    model: str
    net: nets.Net
    params: dict
    state: dict
    opt_state: Any
    progress: dict
    members: int | None
    num_classes: int

    @property
    def name(self) -> str:
        """The run's name (its config's), else the checkpoint's folder."""
        return (self.config.name if self.config is not None else "") or self.path.parent.name

    @property
    def what(self) -> str:
        """What the run is, for messages: ``"an ensemble of 4 members (a sweep)"``,
        ``"a CIFAR run of cifar_model_b"``, ``"a bare checkpoint of vgg16"``."""
        if self.members is not None:
            return f"an ensemble of {self.members} member{'s' * (self.members != 1)} ({self.kind.what})"
        return f"{self.kind.what} of {self.model}"

    @property
    def image_kind(self) -> str:
        """``"imagenet"`` (VGG16: 224x224, ImageNet's normalisation) or ``"cifar"`` (32x32)."""
        return "imagenet" if self.model == "vgg16" else "cifar"

    @property
    def epochs_done(self) -> int | None:
        return self.progress["epoch"] if "epoch" in self.progress else None

    def member_list(self) -> list:
        """Each member of an ensemble: ``Member(point, seed)``, its hyperparameters and seed (the
        config's ``members()``, in the order of the stacked arrays)."""
        if self.members is None:
            raise WrongRunError(f"{shown(self.path)}: expected an ensemble, got {self.what}")
        return self.config.members()

    def single(self, command: str, instead: str = "") -> "TrainedRun":
        """The run itself when it is one net; else WrongRunError, one line naming what it is
        (``instead``: what the user can do about it)."""
        if self.members is not None:
            raise WrongRunError(f"{command}: {shown(self.path)} holds {self.what}: {command} reads one net"
                                + (f" ({instead})" if instead else ""))
        return self

    def views(self, *, tta_flip: bool | None = None, tta_shift: int | None = None,
              shift_weight: float | None = None) -> Views:
        """The views the run was configured with, each given one laid over."""
        cfg = self.config
        stored = (Views(cfg.tta_flip, cfg.tta_shift, cfg.tta_shift_weight, cfg.bf16, cfg.channels_last)
                  if cfg is not None else Views())
        return stored._replace(**{k: v for k, v in (("tta_flip", tta_flip), ("tta_shift", tta_shift),
                                                    ("shift_weight", shift_weight)) if v is not None})

    def evaluated_net(self) -> nets.Net:
        """``net``, or ``nets.ensemble(net, K)`` for an ensemble (stacked arrays, logits ``(K, N, classes)``)."""
        return nets.ensemble(self.net, self.members) if self.members is not None else self.net

    def predictor(self, views: Views, device: torch.device | str) -> tuple[Callable, dict, dict]:
        """``(predict, params, state)`` on ``device``: ``predict(params, state, x) -> logits`` of
        :func:`~experiments.train.step.make_eval` with ``views``, the arrays in channels-last
        layout when the run trained so."""
        predict = make_eval(self.evaluated_net(), tta_flip=views.tta_flip, tta_shift=views.tta_shift,
                            shift_weight=views.shift_weight, bf16=views.bf16,
                            channels_last=views.channels_last)
        params = {k: v.to(device) for k, v in self.params.items()}
        state = {k: v.to(device) for k, v in self.state.items()}
        if views.channels_last:
            params = to_channels_last(params)
        return predict, params, state


def shown(path: Path) -> Path:
    """The run folder of a run's checkpoint file, else the file: how messages name a run."""
    return path.parent if path.name == CHECKPOINT else path


def feature_layers(run: TrainedRun, flag: str) -> list[str]:
    """The layers whose feature maps are drawn when none is named: the first ReLU and the last
    one of the convolutional part (``features.*`` where the net names it so), so both maps are
    images. WrongRunError naming ``flag`` when the net has no ReLU (airbench's GELU)."""
    relus = nets.leaf_names(run.net, op="ReLU")
    if not relus:
        names = nets.leaf_names(run.net)
        raise WrongRunError(f"the {run.model} net has no ReLU: pass {flag} (its layers: "
                            f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    convolutional = [n for n in relus if n.startswith("features")] or list(relus)
    return [relus[0], convolutional[-1]]


def _read(path: Path) -> tuple[dict, dict, dict]:
    """``(tree, progress, config)`` of a ``.safetensors`` checkpoint or a torchvision ``.pth``."""
    if path.suffix == ".pth":
        params, state = nets.load_torchvision_weights(path)
        check_finite({"params": params, "state": state}, str(path))
        return {"params": params, "state": state}, {}, {"model": "vgg16"}
    tree, progress, config = load_run(path)
    if not (isinstance(tree, dict) and "params" in tree):   # a bare tree of nets.save: the params
        tree = {"params": tree, "state": {}}
    return tree, progress, config


def load_trained(path: str | Path, *, model: str | None = None) -> TrainedRun:
    """The run in ``path`` (a run folder, its checkpoint, a ``nets.save`` file or a torchvision
    VGG16 ``.pth``), rebuilt on the CPU (module docstring).

    Args:
      model: the registry's name of the net, for a checkpoint whose config names none.

    Raises:
      FileNotFoundError: no checkpoint there.
      ValueError: one line: an unreadable checkpoint (``nets.checkpoint.CheckpointError``), NaN
        or infinity inside, a config that does not read (``SettingsError``), no model named, or
        parameters that are not the model's.
    """
    path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a run folder or checkpoint file, got {shown(path)} "
                                f"(no {path})")
    tree, progress, data = _read(path)
    kind = kind_of(data) if data else BARE
    config = None if kind is BARE else read_config(kind, data, where=f"{path} (config)")
    if config is not None:
        model = config.model
    elif model is None:
        model = data["model"] if "model" in data else None
    if model not in NET_BUILDERS:
        raise ValueError(f"expected --model among {', '.join(sorted(NET_BUILDERS))} for {path} (its "
                         f"metadata names no model), got {model!r}")
    params, state = tree["params"], tree["state"] if "state" in tree else {}
    members = len(config.seeds) if kind.ensemble else None
    one = nets.unstack(params)[0] if members else params
    try:
        num_classes = num_classes_of(one)
    except ValueError:   # no linear layer: the check of the names below says what is wrong
        num_classes = 10
    if config is not None:
        options = config.net_options()
    else:   # a bare tree: with batch norm when it holds running statistics
        options = {"batch_norm": bool(state)} if "batch_norm" in _accepted(model) else {}
    net = build_net(model, num_classes, options)
    _check_names(net, one, path, members)
    params = {k: params[k] for k in net.layer.param_shapes}   # the net's layer order
    return TrainedRun(path, kind, config, model, net, params, state,
                      tree["opt_state"] if "opt_state" in tree else None, progress, members,
                      num_classes)


def _accepted(model: str):
    return inspect.signature(NET_BUILDERS[model]).parameters


def _check_names(net: nets.Net, params: dict, path: Path, members: int | None) -> None:
    want, got = set(net.layer.param_shapes), set(params)
    if want != got:
        raise ValueError(f"expected the parameters of {net.name} in {path}, got other names "
                         f"(missing {sorted(want - got)[:5]}, unexpected {sorted(got - want)[:5]})")
    for name, shape in net.layer.param_shapes.items():
        if tuple(params[name].shape) != tuple(shape):
            raise ValueError(f"expected {name} of shape {tuple(shape)} in {path} (as {net.name} "
                             f"builds it{' for each member' if members else ''}), got "
                             f"{tuple(params[name].shape)}")

