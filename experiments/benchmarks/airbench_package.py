"""The real peer: the registry's ``airbench`` package (0.1.8, Keller Jordan) trained unmodified on
the CPU, on a CIFAR-10 folder that purenn reads (docs/speedrun.md, "The airbench package itself").

    cfg = PackageConfig(data_dir="../shared/datasets/cifar10-jpeg", seed=0)
    result = run_package(cfg)            # {"accuracy": {"test": {"none": ..., ...}}, "epoch_s": [...]}

``airbench.lib_airbench94.train94`` runs as published: its net, whitening, optimizer, schedule,
lookahead, alternating flip, translate and TTA. Only its device plumbing is replaced, for the
length of the call (:func:`cpu_plumbing`; :data:`PATCHES` names each line, and
:func:`patched_lines` finds them in the installed sources, so a changed package is refused rather
than silently run differently):

* ``net = net.half().cuda()``: ``Module.half`` and ``Module.cuda`` return the module unchanged, so
  the weights stay float32 on the CPU; the forward runs under ``torch.autocast("cpu",
  bfloat16)`` and hands its logits on as float32, purenn's speedrun's precision policy
  (``experiments.train.step``: bf16 forward, float32 loss). airbench on a GPU: fp16 weights and
  activations, batch norm in float32.
* ``torch.cuda.Event`` / ``torch.cuda.synchronize``: a wall-clock event
  (``time.perf_counter``) and no-op, so airbench's own timer times the CPU; every interval it
  times is kept (the whitening, each epoch's training steps, the final TTA evaluation).
* ``test_loader = CifarLoader('cifar10', ...)`` inside ``train``: the same loader class reading
  ``test.pt`` from the folder this module writes, on the CPU (``gpu="cpu"``); nothing is
  downloaded (its ``torchvision.datasets.CIFAR10(download=True)`` is reached only when the
  ``.pt`` file is missing, and it is written first).

The data: purenn's uint8 splits (:func:`experiments.cifar.recipes.load_data`, so any folder,
``--val-split`` and ``--limit-per-class`` as every purenn command) are written in airbench's
own format, ``{"images": (N, 32, 32, 3) uint8, "labels": (N,) int64, "classes": [...]}``. The
training images are put in one fixed random order first (:data:`DATA_ORDER_SEED`): airbench
computes its whitening from the first 5000 images of its file, which in the original CIFAR-10 are
a random sample, while purenn's split is ordered by class.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, TextIO
from unittest import mock

import torch
from torch import nn

from ..cifar.recipes import load_data
from ..common.settings import boolean, number, setting, whole
from ..data.settings import DataSettings
from .timing import machine_info

__all__ = ["PackageConfig", "PACKAGE_VERSION", "PATCHES", "TTA_LEVELS", "DATA_ORDER_SEED",
           "PatchedLine", "patched_lines", "cpu_plumbing", "write_airbench_data", "run_package"]

#: The version pinned by the ``airbench`` extra (pyproject.toml); another is refused.
PACKAGE_VERSION = "0.1.8"

#: airbench's ``tta_level`` 0, 1, 2, by name.
TTA_LEVELS = ("none", "mirror", "mirror_translate")

#: Seed of the one fixed order the training images are written in (not the run's seed: the
#: original CIFAR-10 file has one order, whatever the seed).
DATA_ORDER_SEED = 0

#: ``(module, the line's text, what replaces it)``: every line of the package this module changes
#: the behaviour of (by patching what it calls, never its source).
PATCHES = (
    ("lib_airbench94", "net = net.half().cuda()",
     "Module.half / Module.cuda return the module: float32 weights on the CPU; the forward runs "
     "under torch.autocast('cpu', bfloat16), its logits widened to float32"),
    ("utils", "starter = torch.cuda.Event(enable_timing=True)",
     "a wall-clock event (time.perf_counter)"),
    ("utils", "ender = torch.cuda.Event(enable_timing=True)",
     "a wall-clock event (time.perf_counter)"),
    ("utils", "torch.cuda.synchronize()", "no-op (the CPU is synchronous)"),
    ("utils", "test_loader = CifarLoader('cifar10', train=False, batch_size=2000)",
     "reads test.pt from the folder written from the purenn data, on the CPU; never downloads"),
)


@dataclass(frozen=True)
class PackageConfig(DataSettings):
    """One run of ``airbench.train94`` on the CPU: the data (purenn's), the seed and the few
    values its own API takes; every other hyperparameter is the package's ``hyp``."""

    seed: int = setting(0, whole(0), "seed of torch's global generator, which airbench draws from")
    epochs: float = setting(9.9, number(0, low_open=True), "training epochs (airbench94: 9.9)")
    batch_size: int = setting(1024, whole(1), "images per step (airbench94: 1024)")
    bf16: bool = setting(True, boolean, "forward under bfloat16 autocast (off: float32)")


class PatchedLine(NamedTuple):
    """One patched line of the installed package: where it is and what replaces it."""
    file: str
    line: int
    code: str
    patch: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.code}  ->  {self.patch}"


def _airbench():
    """The installed package, refused in one line when it is missing or another version."""
    try:
        import airbench
        from importlib.metadata import version
    except ImportError:
        raise ImportError("airbench is not installed: pip install 'purenn[airbench]' "
                          f"(airbench=={PACKAGE_VERSION})") from None
    found = version("airbench")
    if found != PACKAGE_VERSION:
        raise ImportError(f"airbench: expected version {PACKAGE_VERSION} (the lines patched here "
                          f"are that version's), got {found}")
    return airbench


def patched_lines() -> list[PatchedLine]:
    """Every line of :data:`PATCHES` as found in the installed sources (file, line number, text);
    ImportError when one is missing, so a changed package is not run under stale patches."""
    airbench = _airbench()
    out = []
    for module_name, code, patch in PATCHES:
        module = sys.modules[f"airbench.{module_name}"]
        path = inspect.getsourcefile(module)
        lines = Path(path).read_text().splitlines()
        hits = [i + 1 for i, text in enumerate(lines) if text.strip() == code]
        if not hits:
            raise ImportError(f"airbench {PACKAGE_VERSION}: expected the line {code!r} in {path}, "
                              "found none")
        rel = os.path.relpath(path, Path(airbench.__file__).parent.parent)
        out.extend(PatchedLine(rel, i, code, patch) for i in hits)
    return out


class _WallClockEvent:
    """``torch.cuda.Event`` on the CPU: ``record`` reads the clock, ``elapsed_time`` returns
    milliseconds (as CUDA's) and appends the seconds to ``intervals``."""

    def __init__(self, intervals: list, **_):
        self.intervals, self.t = intervals, None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_WallClockEvent") -> float:
        seconds = end.t - self.t
        self.intervals.append(seconds)
        return 1e3 * seconds


def _cpu_net(make_net: Callable[[], nn.Module], bf16: bool) -> Callable[[], nn.Module]:
    """``make_net`` with ``.half()`` and ``.cuda()`` as identities while it runs, and the net's
    forward under bf16 autocast with float32 logits (purenn's ``make_step`` policy)."""
    def build():
        with mock.patch.object(nn.Module, "half", lambda self: self), \
             mock.patch.object(nn.Module, "cuda", lambda self, device=None: self):
            net = make_net()
        forward = net.forward

        def autocast_forward(x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return forward(x).float()
        net.forward = autocast_forward
        return net
    return build


@contextlib.contextmanager
def cpu_plumbing(data_root: Path, intervals: list):
    """Within the block, ``airbench.utils.train`` runs on the CPU: :data:`PATCHES` but the net's
    (which :func:`_cpu_net` wraps), restored after. ``intervals`` receives every interval
    airbench times, in seconds."""
    airbench = _airbench()
    utils = sys.modules["airbench.utils"]
    base = utils.CifarLoader

    class CpuLoader(base):
        """airbench's loader, on the CPU, with its hard-coded ``'cifar10'`` folder redirected."""
        def __init__(self, path, *args, gpu=0, **kwargs):
            super().__init__(str(data_root) if path == "cifar10" else path, *args, gpu="cpu", **kwargs)

    with mock.patch.object(utils, "CifarLoader", CpuLoader), \
         mock.patch.object(torch.cuda, "Event", lambda **kw: _WallClockEvent(intervals, **kw)), \
         mock.patch.object(torch.cuda, "synchronize", lambda device=None: None):
        yield airbench


def write_airbench_data(folder: Path, split: str, data, *, shuffle: bool = False) -> Path:
    """``folder/<split>.pt`` in airbench's format from a purenn dataset (``images (N, 3, 32, 32)
    uint8``); ``shuffle``: in the fixed order of :data:`DATA_ORDER_SEED` (the training file)."""
    images, labels = data.images, data.labels
    if shuffle:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DATA_ORDER_SEED))
        images, labels = images[order], labels[order]
    path = folder / f"{split}.pt"
    torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels.clone(),
                "classes": list(data.classes)}, path)
    return path


def _accuracies(evaluate, model, loader) -> dict:
    return {name: evaluate(model, loader, tta_level=level) for level, name in enumerate(TTA_LEVELS)}


def run_package(cfg: PackageConfig, *, stream: TextIO | None = None) -> dict:
    """Train ``airbench.train94`` once on ``cfg``'s data on the CPU; return what was measured.

    Returns ``{"accuracy": {split: {tta name: fraction}}, "whiten_s", "epoch_s": [seconds of
    each epoch's training steps, as airbench times them], "train_s", "wall_s", "load_average":
    {"start", "end"}, "patched": [lines], "machine", "data", "config"}``. ``split`` is ``test``
    (with ``cfg.test``) and ``val`` (with a validation split). Every value is computed by the
    package's own ``train`` and ``evaluate``.
    """
    stream = sys.stderr if stream is None else stream
    lines = patched_lines()
    print(f"airbench {PACKAGE_VERSION}, lib_airbench94.train94, unmodified; patched (device "
          "plumbing only):", file=stream)
    for line in lines:
        print(f"  {line}", file=stream)
    train, val, test = load_data(cfg)
    held_out = test if test is not None else val
    if held_out is None:
        raise ValueError("airbench_package: expected a test split or a validation split to "
                         "evaluate on (--no-test with --val-split 0 leaves none)")
    airbench = _airbench()
    from airbench.lib_airbench94 import hyp, make_net94
    from airbench.utils import CifarLoader, evaluate

    load_start = os.getloadavg()
    intervals: list[float] = []
    with tempfile.TemporaryDirectory(prefix="airbench-data-") as tmp:
        root = Path(tmp)
        write_airbench_data(root, "train", train, shuffle=True)
        write_airbench_data(root, "test", held_out)
        torch.manual_seed(cfg.seed)
        with cpu_plumbing(root, intervals):
            loader = CifarLoader(str(root), train=True, batch_size=cfg.batch_size,
                                 aug=hyp["aug"], altflip=True, gpu="cpu")
            started = time.perf_counter()
            with contextlib.redirect_stdout(stream):
                model = airbench.train94(loader, epochs=cfg.epochs,
                                         make_net=_cpu_net(make_net94, cfg.bf16), verbose=True)
            wall = time.perf_counter() - started
            accuracy = {}
            for split, data in (("test", test), ("val", val)):
                if data is None:
                    continue
                if data is not held_out:
                    write_airbench_data(root, "test", data)
                eval_loader = CifarLoader(str(root), train=False, batch_size=2000, gpu="cpu")
                accuracy[split] = _accuracies(evaluate, model, eval_loader)
    n_epochs = len(intervals) - 2  # the whitening before, the final TTA evaluation after
    epoch_s = intervals[1:1 + n_epochs]
    return {
        "package": f"airbench {PACKAGE_VERSION}", "function": "airbench.lib_airbench94.train94",
        "accuracy": accuracy, "whiten_s": intervals[0], "epoch_s": epoch_s,
        "train_s": sum(intervals[:1 + n_epochs]), "wall_s": wall,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "patched": [line._asdict() for line in lines], "machine": machine_info("cpu"),
        "data": {"train": len(train.labels), "val": len(val.labels) if val is not None else 0,
                 "test": len(test.labels) if test is not None else 0},
        "config": cfg.to_json(),
    }
