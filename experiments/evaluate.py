"""Evaluate any run's checkpoint on any CIFAR-format folder: accuracy and per-class accuracy.

    python -m experiments.evaluate --checkpoint runs/cifar_model_b-fast-s0 --data-dir DIR [--split test]

The net is rebuilt from the config stored in the checkpoint; the data folder may be in either
format (python batches or image folders) and its classes must match the run's number of classes.
``--split val`` carves the run's own validation split out of train again (same seed and size), so
evaluation choices such as ``--tta-shift`` can be made on it and not on test.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import nets

from . import engine
from .cifar_common import build_net, split_train
from .data import DataNotFoundError, find_data_dir, load_cifar10


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
        raise ValueError(f"evaluate: --split val: expected a run trained with a validation split, "
                         f"got val_split={cfg.get('val_split')!r} in {cfg.get('name')}'s config")
    return val


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.checkpoint)
    path = path / engine.CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        print(f"error: evaluate: expected a run folder or checkpoint file, got {args.checkpoint} "
              f"(no {path})", file=sys.stderr)
        return 2
    tree, meta = nets.load(path)
    cfg = json.loads(meta["config"])
    try:
        data = _load_split(args, cfg)
    except (DataNotFoundError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params, state = tree["params"], tree["state"]
    # The last linear weight (out, in) of the net gives its number of classes.
    num_classes = [v for k, v in params.items() if k.endswith("weight") and v.dim() == 2][-1].shape[0]
    if num_classes != len(data.classes):
        print(f"error: evaluate: expected a data set with {num_classes} classes (as the checkpoint's "
              f"last layer), got {len(data.classes)} classes {data.classes}", file=sys.stderr)
        return 2
    net = build_net(cfg, num_classes)
    device = engine.resolve_device(args.device)
    params = {k: v.to(device) for k, v in params.items()}
    state = {k: v.to(device) for k, v in state.items()}
    tta = cfg.get("tta_flip", False) if args.tta_flip is None else args.tta_flip
    shift = cfg.get("tta_shift", 0) if args.tta_shift is None else args.tta_shift
    try:
        predict = engine.make_eval(net, tta_flip=tta, tta_shift=shift, bf16=bool(cfg.get("bf16")),
                                   channels_last=bool(cfg.get("channels_last")))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.get("channels_last"):
        params = engine.to_channels_last(params)
    res = engine.evaluate(predict, params, state, data, device=device, batch_size=args.batch_size)
    progress = json.loads(meta["progress"])
    print(f"{cfg['model']} ({cfg['name']}, after {progress['epoch']} epochs) on {args.split} "
          f"of {data.images.shape[0]} images, tta_flip={tta}, tta_shift={shift}")
    print(f"accuracy {100 * res.accuracy:.2f}%  loss {res.loss:.4f}")
    per_class = res.per_class_accuracy()
    for name, acc, n in zip(data.classes, per_class.tolist(), res.confusion.sum(1).tolist()):
        print(f"  {name:>12} {100 * acc:6.2f}%  ({n} images)")
    if args.json:
        print(json.dumps({"accuracy": res.accuracy, "loss": res.loss,
                          "per_class": dict(zip(data.classes, per_class.tolist()))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
