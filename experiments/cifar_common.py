"""What the three CIFAR-10 experiments share: the command line, the two recipes, and ``main``.

A *recipe* is a dict of hyperparameters (docs/training.md gives every value and its reason);
command-line flags override single entries. The resolved dict is the run's config: it is
written to ``runs/<name>/config.json`` and into every checkpoint, so ``--resume`` and
``experiments.evaluate`` rebuild exactly the same net and optimizer from it.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

import layers
import nets
import optim

from . import cpu_allocator, engine
from .data import DataNotFoundError, find_data_dir, load_cifar10, validation_split

__all__ = ["RECIPES", "MODELS", "build_parser", "resolve_config", "build_net", "build_optimizer",
           "build_loss", "load_data", "split_train", "parse_val_split", "main"]

MODELS = ("cifar_model_a", "cifar_model_b", "cifar_model_c")

# Settings every recipe shares unless it says otherwise.
_COMMON = dict(seed=0, device="auto", val_split="5000", limit_per_class=None, eval_batch_size=1000,
               bf16=True, channels_last=True, compile=False, crop=4, flip=True,
               retain_freed_memory=True, tta_shift=0, cutout=0)

# "report": the report's conditions as far as its text states them; the rest is our default.
# Its data section names two dataloader transforms, "normalization of pixel values, random
# flipping of images": so normalise + random horizontal flip, and no crop (not named).
_REPORT = dict(optimizer="adam", lr=1e-3, momentum=0.0, nesterov=False, weight_decay=0.0,
               decay_mask=False, schedule="constant", label_smoothing=0.0, crop=0, flip=True,
               tta_flip=False, epochs=20)

# "fast": SGD + Nesterov, one-cycle, label smoothing, crop + flip, decay mask, flip TTA. It trains
# on all 50,000 train images: its choices were made on 45,000 / 5,000 runs (``--val-split 5000``,
# docs/results.md), and the final recipe gets the held-out images back.
_FAST = dict(val_split="0", optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4, decay_mask=True,
             schedule="onecycle", pct_start=0.25, div_factor=10.0, final_div_factor=100.0,
             label_smoothing=0.1, tta_flip=True, batch_size=512)

RECIPES: dict[str, dict[str, dict]] = {
    "cifar_model_a": {
        "report": {**_COMMON, **_REPORT, "batch_size": 32},
        "fast": {**_COMMON, **_FAST, "lr": 0.2, "epochs": 30},
    },
    "cifar_model_b": {
        "report": {**_COMMON, **_REPORT, "batch_size": 125, "dropout": 0.1, "head_dropout": 0.2},
        "fast": {**_COMMON, **_FAST, "lr": 0.4, "epochs": 45, "dropout": 0.1, "head_dropout": 0.2},
    },
    "cifar_model_c": {
        "report": {**_COMMON, **_REPORT, "batch_size": 125, "dropout": 0.1, "head_dropout": 0.2},
        "fast": {**_COMMON, **_FAST, "lr": 0.4, "epochs": 50, "dropout": 0.1, "head_dropout": 0.2},
    },
}

_NETS = {"cifar_model_a": nets.model_a, "cifar_model_b": nets.model_b, "cifar_model_c": nets.model_c}


def parse_val_split(text: str | float | int | None) -> float | int:
    """``"0.1"`` -> 0.1 (a fraction), ``"5000"`` -> 5000 (a count), None/``"0"`` -> 0 (no split)."""
    if text is None:
        return 0
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--val-split: expected a fraction in [0, 1) or a whole count, got {text!r}") from None
    if value >= 1 or value == 0:
        if value != int(value):
            raise ValueError(f"--val-split: expected a fraction in [0, 1) or a whole count, got {text!r}")
        return int(value)
    if value < 0:
        raise ValueError(f"--val-split: expected a fraction in [0, 1) or a whole count, got {text!r}")
    return value


def build_parser(model: str, description: str) -> argparse.ArgumentParser:
    """The shared command line; every flag defaults to None = "take it from the recipe"."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.{model}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Recipes: " + "; ".join(
                                    f"{r}: " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items())
                                                         if _COMMON.get(k, object()) != v)
                                    for r, cfg in RECIPES[model].items()))
    a = p.add_argument
    a("--recipe", choices=sorted(RECIPES[model]), default="fast",
      help="hyperparameter set (default: fast); see docs/training.md")
    a("--epochs", type=int, help="training epochs")
    a("--batch-size", type=int, help="images per step (SGD lr is scaled linearly with it "
                                     "unless --lr is given)")
    a("--lr", type=float, help="(peak) learning rate")
    a("--seed", type=int, help="seed of the run key: init, split, shuffling, augmentation, dropout")
    a("--device", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    a("--out", default="runs", help="folder holding the run folders (default: runs)")
    a("--name", help="run folder name (default: <model>-<recipe>-s<seed>)")
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--val-split", help="validation images carved from train: a fraction (0.1) or a count "
                          "(5000); 0 for none")
    a("--limit-per-class", type=int, help="use only the first N images of each class (smoke runs)")
    a("--resume", metavar="RUN_DIR", help="continue runs/<name> from its last checkpoint "
                                          "(its saved config is used)")
    a("--label-smoothing", type=float, help="label smoothing of the training loss")
    a("--weight-decay", type=float, help="L2 weight decay (coupled, as torch.optim)")
    a("--bf16", action=argparse.BooleanOptionalAction, help="bfloat16 autocast")
    a("--channels-last", action=argparse.BooleanOptionalAction, help="channels-last memory format")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the step")
    a("--crop", type=int, metavar="PIXELS",
      help="training augmentation: zero-pad by PIXELS and crop back at a random offset (0: off)")
    a("--flip", action=argparse.BooleanOptionalAction,
      help="training augmentation: mirror each image with probability 1/2")
    a("--tta-flip", action=argparse.BooleanOptionalAction, help="average logits with the mirror image")
    a("--cutout", type=int, metavar="PIXELS",
      help="training augmentation: set a random PIXELS x PIXELS square of each image to the mean "
           "colour (0: off)")
    a("--tta-shift", type=int, metavar="PIXELS",
      help="also average over the image moved by (s, s) and (-s, -s) pixels (0: off)")
    a("--retain-freed-memory", action=argparse.BooleanOptionalAction,
      help="keep freed memory in the process (glibc; no page faults per step, see "
           "experiments/cpu_allocator.py)")
    a("--max-epochs", type=int, help="stop (resumably) after this many completed epochs")
    a("--no-test", action="store_true", help="do not evaluate on the test split each epoch")
    a("--benchmark", type=int, metavar="STEPS",
      help="time STEPS training steps (at the recipe's batch size, on random images) for fp32, "
           "channels_last, bf16 and bf16+channels_last, interleaved in rounds, then exit")
    return p


def benchmark(cfg: dict, steps: int, rounds: int = 3, stream=None) -> dict[str, float]:
    """Images/s of the full training step (augmentation included) for each speed option.

    ``steps`` timed steps per option and round (after one untimed warm-up step), options
    interleaved within each round so that a noisy, shared machine slows them alike; the
    median over rounds is reported.
    """
    stream = sys.stderr if stream is None else stream
    device = engine.resolve_device(cfg["device"])
    from layers import random as jr

    from .augment import augment_batch

    bs = cfg["batch_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (bs, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (bs,), generator=g).to(device)
    net = build_net(cfg)
    modes = {"fp32": {}, "channels_last": {"channels_last": True}, "bf16": {"bf16": True},
             "bf16+channels_last": {"bf16": True, "channels_last": True}}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode, opts in modes.items():
            params, state = net.init(jr.key(0), device=device)
            opt = build_optimizer(cfg, steps + 1)
            opt_state = opt.init(params)
            if opts.get("channels_last"):
                params, opt_state = engine.to_channels_last(params), engine.to_channels_last(opt_state)
            step = engine.make_step(net, opt, build_loss(cfg), **opts)
            for i in range(steps + 1):
                if i == 1:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                x = augment_batch(jr.key(i), images)
                params, state, opt_state, m = step(params, state, opt_state, (x, labels), jr.key(i))
                m["loss"].item()
            rates[mode].append(steps * bs / (time.perf_counter() - t0))
            print(f"round {r + 1}/{rounds} {mode:>18}: {rates[mode][-1]:7.1f} img/s", file=stream)
    result = {m: sorted(v)[len(v) // 2] for m, v in rates.items()}
    print(f"median img/s over {rounds} rounds of {steps} steps, batch {bs}, {device}, "
          f"{torch.get_num_threads()} threads:", file=stream)
    for m, v in result.items():
        print(f"  {m:>18}: {v:7.1f} img/s ({v / result['fp32']:.2f}x fp32)", file=stream)
    return result


def resolve_config(model: str, args: argparse.Namespace) -> dict:
    """The recipe for ``model`` with the flags that were given laid over it."""
    cfg = dict(RECIPES[model][args.recipe])
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "seed": args.seed, "device": args.device, "val_split": args.val_split,
                 "limit_per_class": args.limit_per_class, "label_smoothing": args.label_smoothing,
                 "weight_decay": args.weight_decay, "bf16": args.bf16,
                 "channels_last": args.channels_last, "compile": args.compile,
                 "crop": args.crop, "flip": args.flip,
                 "tta_flip": args.tta_flip, "tta_shift": args.tta_shift, "cutout": args.cutout,
                 "retain_freed_memory": args.retain_freed_memory}
    for flag, value in (("--crop", args.crop), ("--cutout", args.cutout), ("--tta-shift", args.tta_shift)):
        if value is not None and value < 0:
            raise ValueError(f"{flag}: expected a whole number of pixels >= 0, got {value}")
    if args.batch_size is not None and args.lr is None and cfg["optimizer"] == "sgd":
        cfg["lr"] = cfg["lr"] * args.batch_size / cfg["batch_size"]  # linear scaling rule
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["val_split"] = str(cfg["val_split"])
    parse_val_split(cfg["val_split"])
    cfg.update(model=model, recipe=args.recipe, data_dir=args.data_dir, test=not args.no_test)
    cfg["name"] = args.name or f"{model}-{args.recipe}-s{cfg['seed']}"
    return cfg


def build_net(cfg: dict, num_classes: int = 10):
    """The config's net: ``nets.model_a/b/c(num_classes, ...)``."""
    kwargs = {k: cfg[k] for k in ("dropout", "head_dropout") if k in cfg}
    return _NETS[cfg["model"]](num_classes, **kwargs)


def build_optimizer(cfg: dict, steps_per_epoch: int):
    """The config's optimizer, with its learning-rate schedule over ``epochs * steps_per_epoch``."""
    total = cfg["epochs"] * steps_per_epoch
    if cfg["schedule"] == "onecycle" and total < 4:  # too short to warm up and anneal
        lr = cfg["lr"]
    elif cfg["schedule"] == "onecycle":
        # The warm-up must span >= 2 steps (one_cycle_schedule refuses an empty phase, as
        # torch's OneCycleLR cannot run one): smoke runs have only a few steps.
        pct = max(cfg["pct_start"], 2.0 / total)
        lr = optim.one_cycle_schedule(cfg["lr"], total, pct_start=pct,
                                      anneal_strategy="linear", div_factor=cfg["div_factor"],
                                      final_div_factor=cfg["final_div_factor"])
    elif cfg["schedule"] == "constant":
        lr = cfg["lr"]
    else:
        raise ValueError(f"build_optimizer: expected schedule 'onecycle' or 'constant', got {cfg['schedule']!r}")
    mask = optim.decay_mask_no_bias_or_norm if cfg["decay_mask"] else None
    if cfg["optimizer"] == "sgd":
        return optim.sgd(lr, momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                         weight_decay=cfg["weight_decay"], weight_decay_mask=mask)
    if cfg["optimizer"] == "adam":
        if mask is not None and cfg["weight_decay"]:
            raise ValueError("build_optimizer: expected no decay mask with adam (optim.adam has none), "
                             "got decay_mask=True")
        return optim.adam(lr, weight_decay=cfg["weight_decay"])
    raise ValueError(f"build_optimizer: expected optimizer 'sgd' or 'adam', got {cfg['optimizer']!r}")


def build_loss(cfg: dict):
    """``(logits, y) -> mean cross-entropy`` with the config's label smoothing."""
    return partial(layers.cross_entropy, label_smoothing=float(cfg["label_smoothing"]))


def split_train(full, cfg: dict):
    """``(train, val)`` of the train split ``full`` as the run ``cfg`` carves it (val None: no split).

    The split depends only on ``cfg["val_split"]``, ``cfg["seed"]`` and ``full``'s labels, so
    ``experiments.evaluate --split val`` rebuilds a run's validation images exactly.
    """
    val_size = parse_val_split(cfg.get("val_split"))
    if not val_size:
        return full, None
    tr_idx, va_idx = validation_split(full.labels, val_size, engine.run_keys(cfg["seed"])["split"],
                                      num_classes=len(full.classes))
    return full.subset(tr_idx), full.subset(va_idx)


def load_data(cfg: dict, *, progress: bool = True):
    """``(train, val, test)`` datasets for ``cfg`` (val / test may be None)."""
    root = find_data_dir(cfg.get("data_dir"))
    limit = cfg.get("limit_per_class")
    full = load_cifar10(root, "train", limit_per_class=limit, progress=progress)
    train, val = split_train(full, cfg)
    test = load_cifar10(root, "test", limit_per_class=limit, progress=progress) if cfg.get("test", True) else None
    print(f"data: {root.resolve()} train {len(train.labels)}, val {len(val.labels) if val else 0}, "
          f"test {len(test.labels) if test else 0}", file=sys.stderr)
    return train, val, test


def _sigterm_as_ctrl_c():
    """Let ``kill PID`` of a background run save a checkpoint the way Ctrl-C does; returns the
    previous handler (None when handlers cannot be set from this thread)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def main(model: str, description: str, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train (or resume), print the final table; returns the exit status."""
    args = build_parser(model, description).parse_args(argv)
    if args.benchmark or not args.resume:
        try:
            cfg = resolve_config(model, args)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.benchmark:
        if cfg["retain_freed_memory"]:
            cpu_allocator.retain_freed_memory()
        print(json.dumps(benchmark(cfg, args.benchmark)))
        return 0
    if args.resume:
        run_dir = Path(args.resume)
        try:
            _, progress, cfg = engine.load_run(run_dir)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if cfg.get("model") != model:
            print(f"error: {run_dir} is a run of experiments.{cfg.get('model')}, not of "
                  f"experiments.{model}", file=sys.stderr)
            return 2
        if args.data_dir:
            cfg["data_dir"] = args.data_dir
        if args.device:
            cfg["device"] = args.device
    else:
        run_dir = Path(args.out) / cfg["name"]
        if (run_dir / engine.CHECKPOINT).exists():
            print(f"error: {run_dir} already holds a run; continue it with --resume {run_dir} "
                  "or pick another --name", file=sys.stderr)
            return 2
    try:
        train, val, test = load_data(cfg)
    except (DataNotFoundError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.get("retain_freed_memory", True):   # runs saved before the option existed: on
        cpu_allocator.retain_freed_memory()
    net = build_net(cfg, len(train.classes))
    steps_per_epoch = len(train.labels) // cfg["batch_size"]
    opt = build_optimizer(cfg, steps_per_epoch)
    device = engine.resolve_device(cfg["device"])
    torch.backends.cudnn.benchmark = device.type == "cuda"
    print(f"{model} recipe {cfg['recipe']} on {device}: epochs {cfg['epochs']}, batch "
          f"{cfg['batch_size']}, lr {cfg['lr']}, bf16 {cfg['bf16']}, channels_last "
          f"{cfg['channels_last']}, run dir {run_dir}", file=sys.stderr)
    resume_cmd = f"python -m experiments.{model} --resume {run_dir}"
    previous = _sigterm_as_ctrl_c()
    try:
        result = engine.fit(cfg, net=net, opt=opt, loss_fn=build_loss(cfg), train=train, val=val,
                            test=test, run_dir=run_dir, resume=bool(args.resume),
                            max_epochs=args.max_epochs, resume_command=resume_cmd)
    except engine.NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if result.status == "interrupted":
        return 130
    if result.status == "stopped":
        print(f"stopped after epoch {args.max_epochs}; continue with: {resume_cmd}", file=sys.stderr)
    else:
        last = result.history[-1] if result.history else {}
        print(json.dumps({k: last.get(k) for k in ("epoch", "val_accuracy", "test_accuracy")}))
    return 0
