"""Evaluate any run's checkpoint on any CIFAR-format folder: accuracy and per-class accuracy.

    python -m experiments.evaluate --checkpoint runs/cifar_model_b-fast-s0 --data-dir DIR [--split test]

The net is rebuilt from the config stored in the checkpoint; the data folder may be in either
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
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

import nets

from .cifar.recipes import prepare, split_train
from .data.cifar10 import DataNotFoundError, find_data_dir, load_cifar10
from .report.paired import compare_predictions
from .train import (build_model, evaluate, load_run, make_eval, num_classes_of, resolve_device,
                    to_channels_last)


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


def _load_split(args: argparse.Namespace, cfg: dict):
    """The split to evaluate; ``val`` is rebuilt from the run's ``val_split`` and ``seed``."""
    root = find_data_dir(args.data_dir, download=False)
    if args.split != "val":
        return load_cifar10(root, args.split, limit_per_class=args.limit_per_class)
    limit = cfg.get("limit_per_class") if args.limit_per_class is None else args.limit_per_class
    _, val = split_train(load_cifar10(root, "train", limit_per_class=limit), cfg)
    if val is None:
        raise ValueError(f"--split val: expected a run trained with a validation split, "
                         f"got val_split={cfg.get('val_split')!r} in {cfg.get('name')}'s config")
    return val


def _report_members(results, cfg, opt_state, as_json: bool) -> int:
    """One line per ensemble member: its hyperparameters, seed, accuracy and loss."""
    # (a checkpoint read without a template gives optim.VmappedState back as a dict)
    flags = opt_state.get("diverged") if isinstance(opt_state, dict) else getattr(opt_state, "diverged", None)
    diverged = flags.tolist() if flags is not None else [False] * len(results)
    rows = []
    for k, (res, point, seed, bad) in enumerate(zip(results, cfg["points"], cfg["seeds"], diverged)):
        hp = " ".join(f"{n} {v:g}" for n, v in point.items())
        print(f"  member {k:3d}: {hp} seed {seed}: accuracy {100 * res.accuracy:6.2f}%  loss "
              f"{res.loss:.4f}{'  (diverged: frozen)' if bad else ''}")
        rows.append({**point, "seed": seed, "accuracy": res.accuracy, "loss": res.loss,
                     "diverged": bad})
    if as_json:
        print(json.dumps({"members": rows}))
    return 0


class _Loaded(NamedTuple):
    """A checkpoint made ready to evaluate: its config, progress, predictor and arrays."""

    cfg: dict
    progress: dict
    predict: object
    params: dict
    state: dict
    members: int | None
    num_classes: int
    opt_state: object
    views: str


def _load(checkpoint: str, args: argparse.Namespace, device) -> _Loaded:
    """Read ``checkpoint`` and build its predictor with the TTA of its config or of the flags."""
    # CheckpointError (unreadable, or NaN / inf inside) is a ValueError.
    tree, progress, cfg = load_run(Path(checkpoint))
    if "params" not in tree or not cfg.get("model"):
        raise ValueError(f"expected a training run's checkpoint (params, state and a config "
                         f"naming its model), got {checkpoint}")
    params, state = tree["params"], tree["state"]
    members = len(cfg["seeds"]) if cfg.get("seeds") else None   # an ensemble (a sweep)
    num_classes = num_classes_of(nets.unstack(params)[0] if members else params)
    net = build_model(cfg["model"], num_classes, cfg)
    if members:
        net = nets.ensemble(net, members)
    tta = cfg.get("tta_flip", False) if args.tta_flip is None else args.tta_flip
    shift = cfg.get("tta_shift", 0) if args.tta_shift is None else args.tta_shift
    weight = cfg.get("tta_shift_weight") if args.tta_shift_weight is None else args.tta_shift_weight
    predict = make_eval(net, tta_flip=tta, tta_shift=shift, shift_weight=weight,
                        bf16=bool(cfg.get("bf16")), channels_last=bool(cfg.get("channels_last")))
    params = {k: v.to(device) for k, v in params.items()}
    state = {k: v.to(device) for k, v in state.items()}
    if cfg.get("channels_last"):
        params = to_channels_last(params)
    views = (f"tta_flip={tta}, tta_shift={shift}"
             + (f", tta_shift_weight={weight:g}" if shift and weight is not None else ""))
    return _Loaded(cfg, progress, predict, params, state, members, num_classes,
                   tree.get("opt_state"), views)


def _check_classes(run: _Loaded, data) -> None:
    if run.num_classes != len(data.classes):
        raise ValueError(f"expected a data set with {run.num_classes} classes (as the checkpoint's "
                         f"last layer), got {len(data.classes)} classes {data.classes}")


def _header(run: _Loaded, args, data) -> str:
    return (f"{run.cfg['model']} ({run.cfg.get('name')}, after {run.progress.get('epoch')} epochs) "
            f"on {args.split} of {data.images.shape[0]} images, {run.views}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def refuse(err) -> int:
        print(f"error: evaluate: {err}", file=sys.stderr)
        return 2

    if args.batch_size < 1:
        return refuse(f"--batch-size: expected a whole number >= 1, got {args.batch_size}")
    if args.limit_per_class is not None and args.limit_per_class < 1:
        return refuse(f"--limit-per-class: expected a whole number >= 1, got {args.limit_per_class}")
    try:
        device = resolve_device(args.device)
        run = _load(args.checkpoint, args, device)
        data = _load_split(args, run.cfg)
        _check_classes(run, data)
        other = None
        if args.against:
            other = _load(args.against, args, device)
            if run.members or other.members:
                raise ValueError("--against: expected two single-net runs, got an ensemble's "
                                 "checkpoint (evaluate its members one by one)")
            # test / train are the same folder for both; a validation split is the run's own
            other_data = _load_split(args, other.cfg) if args.split == "val" else data
            if not (torch.equal(other_data.labels, data.labels)
                    and torch.equal(other_data.images, data.images)):
                raise ValueError(f"--against: expected both runs evaluated on the same {args.split} "
                                 f"images, got different ones (a validation split depends on the "
                                 f"run's seed and val_split: {run.cfg.get('seed')}/"
                                 f"{run.cfg.get('val_split')} against {other.cfg.get('seed')}/"
                                 f"{other.cfg.get('val_split')})")
    except (DataNotFoundError, FileNotFoundError, ValueError) as err:
        return refuse(str(err).removeprefix("evaluate: "))
    res = evaluate(run.predict, run.params, run.state, data, device=device,
                   batch_size=args.batch_size, prepare=prepare)
    print(_header(run, args, data))
    if run.members:
        return _report_members(res, run.cfg, run.opt_state, args.json)
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
        name_a, name_b = run.cfg.get("name") or "A", other.cfg.get("name") or "B"
        print(f"against {_header(other, args, data)}")
        print(f"accuracy {100 * res_b.accuracy:.2f}%  loss {res_b.loss:.4f}")
        print(paired.describe(name_a, name_b))
        result["against"] = {"accuracy": res_b.accuracy, "loss": res_b.loss,
                             **paired._asdict()}
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
