"""Evaluate any run's checkpoint on any CIFAR-format folder: accuracy and per-class accuracy.

    python -m experiments.evaluate --checkpoint runs/cifar_model_b-fast-s0 --data-dir DIR [--split test]

The net is rebuilt from the config stored in the checkpoint (:mod:`experiments.catalog`: any run
folder; a sweep's ensemble is reported member by member); the data folder may be in either
format (python batches or image folders) and its classes must match the run's number of classes.
``--split val`` carves the run's own validation split out of train again (same seed and size), so
evaluation choices such as ``--tta-shift`` can be made on it and not on test. ``--against``
compares two runs image by image (:mod:`experiments.report.paired`): what a choice made on a
5,000-image split needs, since a few tenths of a point is that split's binomial noise.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import NamedTuple, Sequence

import torch

from .catalog import TrainedRun, Views, load_trained, shown
from .cifar.recipes import prepare, split_train
from .common.settings import whole_number
from .data.cifar10 import DataNotFoundError, find_data_dir, load_cifar10
from .report.paired import compare_predictions
from .train import evaluate, resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (runs/<name>) or its checkpoint.safetensors")
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    p.add_argument("--split", choices=("test", "train", "val"), default="test",
                   help="val: the run's validation split, carved from train as the run did")
    p.add_argument("--limit-per-class", type=int, help="only the first N images of each class")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction,
                   help="average with the mirror image (default: as the run was configured)")
    p.add_argument("--tta-shift", type=int, metavar="PIXELS",
                   help="also average over the views moved by (s, s) and (-s, -s) pixels "
                        "(default: as the run was configured)")
    p.add_argument("--tta-shift-weight", type=float, metavar="W",
                   help="the shifted views' share of the average, in [0, 1] (airbench: 0.5); "
                        "default: as the run was configured, else every view the same")
    p.add_argument("--against", metavar="CHECKPOINT",
                   help="a second run evaluated on the same images (each with its own config's "
                        "views unless the --tta flags set them for both): both accuracies, their "
                        "paired difference and McNemar's exact test")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    return p


def _load_split(args: argparse.Namespace, run: TrainedRun):
    """The split to evaluate; ``val`` is rebuilt from the run's ``val_split`` and ``seed``."""
    root = find_data_dir(args.data_dir, download=False)
    if args.split != "val":
        return load_cifar10(root, args.split, limit_per_class=args.limit_per_class)
    cfg = run.config
    limit = cfg.limit_per_class if args.limit_per_class is None else args.limit_per_class
    _, val = split_train(load_cifar10(root, "train", limit_per_class=limit), cfg)
    if val is None:
        raise ValueError(f"--split val: expected a run trained with a validation split, "
                         f"got val_split={cfg.val_split!r} in {cfg.name}'s config")
    return val


def _diverged(opt_state, members: int) -> list[bool]:
    """Each member's divergence flag of an ensemble's optimizer state (all False without one)."""
    # (a checkpoint read without a template gives optim.VmappedState back as a dict)
    if isinstance(opt_state, dict):
        flags = opt_state["diverged"] if "diverged" in opt_state else None
    else:
        flags = getattr(opt_state, "diverged", None)
    return flags.tolist() if flags is not None else [False] * members


def _report_members(results, run: TrainedRun, as_json: bool) -> int:
    """One line per ensemble member: its hyperparameters, seed, accuracy and loss."""
    rows = []
    for k, (res, member, bad) in enumerate(zip(results, run.member_list(),
                                               _diverged(run.opt_state, run.members))):
        hp = " ".join(f"{n} {v:g}" for n, v in member.point.items())
        print(f"  member {k:3d}: {hp} seed {member.seed}: accuracy {100 * res.accuracy:6.2f}%  loss "
              f"{res.loss:.4f}{'  (diverged: frozen)' if bad else ''}")
        rows.append({**member.point, "seed": member.seed, "accuracy": res.accuracy,
                     "loss": res.loss, "diverged": bad})
    if as_json:
        print(json.dumps({"members": rows}))
    return 0


class _Loaded(NamedTuple):
    """A run made ready to evaluate: the run, its predictor and arrays on the device, its views."""

    run: TrainedRun
    predict: object
    params: dict
    state: dict
    views: Views


def _load(checkpoint: str, args: argparse.Namespace, device) -> _Loaded:
    """Read ``checkpoint`` and build its predictor with the TTA of its config or of the flags."""
    run = load_trained(checkpoint)
    if run.config is None:
        raise ValueError(f"expected a training run's checkpoint (params, state and a config "
                         f"naming its model), got {run.what} in {checkpoint}")
    views = run.views(tta_flip=args.tta_flip, tta_shift=args.tta_shift,
                      shift_weight=args.tta_shift_weight)
    predict, params, state = run.predictor(views, device)
    return _Loaded(run, predict, params, state, views)


def _check_classes(loaded: _Loaded, data) -> None:
    if loaded.run.num_classes != len(data.classes):
        raise ValueError(f"expected a data set with {loaded.run.num_classes} classes (as the "
                         f"checkpoint's last layer), got {len(data.classes)} classes {data.classes}")


def _header(loaded: _Loaded, args, data) -> str:
    run, n = loaded.run, loaded.run.epochs_done
    return (f"{run.model} ({run.name}, after {n} epoch{'s' * (n != 1)}) on {args.split} of "
            f"{data.images.shape[0]} images, {loaded.views.describe()}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def refuse(err) -> int:
        print(f"error: evaluate: {err}", file=sys.stderr)
        return 2

    try:
        whole_number(args.batch_size, "batch_size")
        if args.limit_per_class is not None:
            whole_number(args.limit_per_class, "limit_per_class")
        device = resolve_device(args.device)
        mine = _load(args.checkpoint, args, device)
        data = _load_split(args, mine.run)
        _check_classes(mine, data)
        other = None
        if args.against:
            other = _load(args.against, args, device)
            for loaded in (mine, other):
                if loaded.run.members:
                    raise ValueError(f"--against: expected two single-net runs, got an ensemble's "
                                     f"checkpoint: {shown(loaded.run.path)} holds {loaded.run.what} "
                                     "(evaluate its members one by one)")
            # test / train are the same folder for both; a validation split is the run's own
            other_data = _load_split(args, other.run) if args.split == "val" else data
            if not (torch.equal(other_data.labels, data.labels)
                    and torch.equal(other_data.images, data.images)):
                a, b = mine.run.config, other.run.config
                raise ValueError(f"--against: expected both runs evaluated on the same {args.split} "
                                 f"images, got different ones (a validation split depends on the "
                                 f"run's seed and val_split: {a.seed}/{a.val_split} against "
                                 f"{b.seed}/{b.val_split})")
    except (DataNotFoundError, FileNotFoundError, ValueError) as err:
        return refuse(str(err).removeprefix("evaluate: "))
    res = evaluate(mine.predict, mine.params, mine.state, data, device=device,
                   batch_size=args.batch_size, prepare=prepare)
    print(_header(mine, args, data))
    if mine.run.members:
        print(f"{mine.run.what}: evaluate reports each member")
        return _report_members(res, mine.run, args.json)
    print(f"accuracy {100 * res.accuracy:.2f}%  loss {res.loss:.4f}")
    per_class = res.per_class_accuracy()
    for name, acc, n in zip(data.classes, per_class.tolist(), res.confusion.sum(1).tolist()):
        print(f"  {name:>12} {100 * acc:6.2f}%  ({n} images)")
    result = {"accuracy": res.accuracy, "loss": res.loss,
              "per_class": dict(zip(data.classes, per_class.tolist()))}
    if other is not None:
        res_b = evaluate(other.predict, other.params, other.state, data, device=device,
                         batch_size=args.batch_size, prepare=prepare)
        paired = compare_predictions(res.predictions, res_b.predictions, data.labels)
        print(f"against {_header(other, args, data)}")
        print(f"accuracy {100 * res_b.accuracy:.2f}%  loss {res_b.loss:.4f}")
        print(paired.describe(mine.run.config.name or "A", other.run.config.name or "B"))
        result["against"] = {"accuracy": res_b.accuracy, "loss": res_b.loss,
                             **paired._asdict()}
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
