"""The command line of the three CIFAR-10 experiments (``python -m experiments.cifar_model_b``).

:func:`main` parses the flags, lays them over the recipe, checks every value, and only then
touches the disk: it loads the data, creates the run folder and calls the trainer
(:func:`experiments.train.fit`). Every refusal is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..data.cifar10 import DataNotFoundError
from ..train import CHECKPOINT, distributed, fit, load_run, resolve_device, retain_freed_memory
from ..train.commands import guarded, refusal
from ..train.build import build_loss, build_optimizer
from ..train.lookahead import with_lookahead
from ..train.telemetry import DEFAULT_EVERY
from .recipes import COMMON, RECIPES, augmenter, build_net, check_config, load_data, prepare
from .speed import benchmark

__all__ = ["build_parser", "resolve_config", "resume_config", "main"]

#: Flags a resumed run may take; every other flag would be ignored (the run's saved config is
#: used), so it is refused instead.
RESUME_FLAGS = ("data_dir", "device", "epochs", "max_epochs", "dist_backend", "dist_timeout")


def build_parser(model: str, description: str) -> argparse.ArgumentParser:
    """The shared command line; every flag defaults to None = "take it from the recipe"."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.{model}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Recipes: " + "; ".join(
                                    f"{r}: " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items())
                                                         if COMMON.get(k, object()) != v)
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
    a("--lookahead", action=argparse.BooleanOptionalAction,
      help="every --lookahead-every steps pull the weights to a slow moving average of themselves "
           "(the speedrun's lookahead; experiments/train/lookahead.py)")
    a("--lookahead-every", type=int, metavar="STEPS", help="steps between lookahead pulls (5)")
    a("--bn-momentum", type=float, help="batch norm's running-statistics momentum (torch: 0.1)")
    a("--bn-eps", type=float, help="batch norm's epsilon (torch: 1e-5)")
    a("--whiten-init", action=argparse.BooleanOptionalAction,
      help="start the first convolution from the training images' 3x3 whitening filters (then "
           "trained); nets/whitening.py")
    a("--retain-freed-memory", action=argparse.BooleanOptionalAction,
      help="keep freed memory in the process (glibc; no page faults per step, see "
           "experiments/train/device.py)")
    a("--max-epochs", type=int, help="stop (resumably) after this many completed epochs")
    a("--telemetry", type=int, nargs="?", const=DEFAULT_EVERY, metavar="N",
      help=f"every N steps (default N: {DEFAULT_EVERY}) write per-layer statistics to "
           "runs/<name>/telemetry.jsonl (python -m experiments.inspect draws them); off by default")
    a("--no-test", action="store_true", help="do not evaluate on the test split each epoch")
    a("--sync-bn", action="store_true", default=None,
      help="under torchrun: batch norm takes the statistics of the global batch, summed over the "
           "processes (default: each process's own slice, as torch's DDP); docs/distributed.md")
    a("--dist-backend", choices=distributed.BACKENDS,
      help="under torchrun: the torch.distributed backend (default: nccl on CUDA, gloo on the CPU)")
    a("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="SECONDS",
      help="under torchrun: how long a process waits for the others to start (and for any one "
           f"collective); default {distributed.DEFAULT_TIMEOUT_S}")
    a("--benchmark", type=int, metavar="STEPS",
      help="time STEPS training steps (at the recipe's batch size, on random images) for fp32, "
           "channels_last, bf16 and bf16+channels_last, interleaved in rounds, then exit")
    return p




def resolve_config(model: str, args: argparse.Namespace) -> dict:
    """The recipe for ``model`` with the flags that were given laid over it, checked
    (:func:`experiments.cifar.recipes.check_config`): ValueError names the first bad flag."""
    cfg = dict(RECIPES[model][args.recipe])
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "seed": args.seed, "device": args.device, "val_split": args.val_split,
                 "limit_per_class": args.limit_per_class, "label_smoothing": args.label_smoothing,
                 "weight_decay": args.weight_decay, "bf16": args.bf16,
                 "channels_last": args.channels_last, "compile": args.compile,
                 "crop": args.crop, "flip": args.flip,
                 "tta_flip": args.tta_flip, "tta_shift": args.tta_shift, "cutout": args.cutout,
                 "retain_freed_memory": args.retain_freed_memory, "telemetry": args.telemetry,
                 "sync_bn": args.sync_bn, "lookahead": args.lookahead,
                 "lookahead_every": args.lookahead_every, "bn_momentum": args.bn_momentum,
                 "bn_eps": args.bn_eps, "whiten_init": args.whiten_init}
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a whole number >= 1, got {args.batch_size}")
    if args.batch_size is not None and args.lr is None and cfg["optimizer"] == "sgd":
        cfg["lr"] = cfg["lr"] * args.batch_size / cfg["batch_size"]  # linear scaling rule
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["val_split"] = str(cfg["val_split"])
    cfg.update(model=model, recipe=args.recipe, data_dir=args.data_dir, test=not args.no_test)
    cfg["name"] = args.name or f"{model}-{args.recipe}-s{cfg['seed']}"
    check_config(cfg)
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ValueError(f"--max-epochs: expected a whole number >= 1, got {args.max_epochs}")
    return cfg




def resume_config(args: argparse.Namespace, run_dir: Path, model: str) -> tuple[dict, dict]:
    """``(config, progress)`` of the run in ``run_dir`` with ``--data-dir``, ``--device`` and
    ``--epochs`` applied; ValueError (one line) for anything else given, a run of another model,
    or an ``--epochs`` that cannot extend this run.

    ``--epochs N`` extends (or shortens) a run whose schedule is constant, as long as ``N`` is at
    least the epochs already done. A one-cycle schedule spans the run's planned epochs, so
    changing them would change the learning rate of steps already taken: refused.
    """
    defaults = vars(build_parser(model, "").parse_args([]))
    given = sorted(k for k, v in vars(args).items()
                   if k not in RESUME_FLAGS + ("resume", "out") and v != defaults.get(k))
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"--resume: expected only --data-dir, --device, --epochs or --max-epochs "
                         f"beside it (the run's saved config is used), got {flags}")
    _, progress, cfg = load_run(run_dir)
    if cfg.get("model") != model:
        raise ValueError(f"{run_dir} is a run of experiments.{cfg.get('model')}, not of "
                         f"experiments.{model}")
    if args.data_dir:
        cfg["data_dir"] = args.data_dir
    if args.device:
        cfg["device"] = args.device
    if args.epochs is not None and args.epochs != cfg["epochs"]:
        done = progress.get("epoch", 0)
        spans = (f"{cfg.get('schedule')} schedule" if cfg.get("schedule") != "constant" else
                 "lookahead decay" if cfg.get("lookahead") else None)
        if spans:
            raise ValueError(f"--epochs {args.epochs}: expected the run's {cfg['epochs']} epochs; "
                             f"its {spans} spans them, so extending it would change steps "
                             f"already taken. Start a new run with --epochs {args.epochs}")
        if args.epochs < max(done, 1):
            raise ValueError(f"--epochs {args.epochs}: expected at least the {done} epochs the run "
                             "has completed")
        cfg["epochs"] = args.epochs
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ValueError(f"--max-epochs: expected a whole number >= 1, got {args.max_epochs}")
    check_config(cfg)
    return cfg, progress


def restarted_config(cfg: dict, run_dir: Path) -> dict | None:
    """The saved config of ``run_dir`` when torchrun restarted the workers
    (``--max-restarts``) after this run wrote its checkpoint: the restart then resumes it. None
    on a first attempt or without a checkpoint; ValueError when the checkpoint is of a run with
    another config (a first attempt refused to clobber it)."""
    if distributed.restart_count() == 0 or not (run_dir / CHECKPOINT).exists():
        return None
    _, _, saved = load_run(run_dir)
    where = ("data_dir", "device")
    if {k: v for k, v in saved.items() if k not in where} != {k: v for k, v in cfg.items()
                                                               if k not in where}:
        raise ValueError(f"torchrun restart: expected {run_dir} to hold this command's run to "
                         f"resume, got a run with another config; pick another --name")
    print(f"torchrun restart {distributed.restart_count()}: resuming {run_dir}", file=sys.stderr)
    return saved


def main(model: str, description: str, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train (or resume), print the final table; returns the exit status.

    Under ``torchrun`` every process runs this: all of them train, rank 0 alone writes and
    prints (docs/distributed.md).
    """
    args = build_parser(model, description).parse_args(argv)

    try:
        resume = bool(args.resume)
        if args.resume:
            run_dir = Path(args.resume)
            cfg, _ = resume_config(args, run_dir, model)
        else:
            cfg = resolve_config(model, args)
            run_dir = Path(args.out) / cfg["name"]
            restarted = restarted_config(cfg, run_dir)
            if restarted is not None:
                cfg, resume = restarted, True
    except (ValueError, FileNotFoundError) as err:   # CheckpointError is a ValueError
        return refusal(err)
    if args.benchmark:
        if cfg["retain_freed_memory"]:
            retain_freed_memory()
        print(json.dumps(benchmark(cfg, args.benchmark)))
        return 0
    try:
        parallel = distributed.start(cfg, backend=args.dist_backend, timeout_s=args.dist_timeout)
    except (ValueError, distributed.StartError) as err:
        return refusal(err)
    try:
        code = _train(model, args, cfg, run_dir, resume, parallel)
    finally:
        distributed.stop(parallel)
    return distributed.exit_now(parallel, code)


def _train(model: str, args, cfg: dict, run_dir: Path, resume: bool, parallel) -> int:
    """Load the data, build the run's parts and call :func:`fit`; the exit status."""
    problem = None
    if not resume and (run_dir / CHECKPOINT).exists():
        problem = (f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                   "or pick another --name")
    else:
        try:
            train, val, test = load_data(cfg)
        except (DataNotFoundError, FileNotFoundError, ValueError) as err:
            problem = err
    if problem is None and len(train.labels) // cfg["batch_size"] < 1:
        problem = (f"--batch-size {cfg['batch_size']}: expected at most the {len(train.labels)} "
                   "training images (lower --batch-size, or raise --limit-per-class)")
    # Every rank decides before any writes: one that refuses stops them all.
    if parallel is not None and not parallel.all_ok(problem is None) and problem is None:
        problem = f"distributed: rank {parallel.rank} stops: another rank refused (its error is above)"
    if problem is not None:
        return refusal(problem)
    steps_per_epoch = len(train.labels) // cfg["batch_size"]
    if cfg.get("retain_freed_memory", True):   # runs saved before the option existed: on
        retain_freed_memory()
    net = build_net(cfg, len(train.classes), None if resume else train.images)
    opt = build_optimizer(cfg, steps_per_epoch)
    hooks = None
    if cfg.get("lookahead"):
        opt, hooks = with_lookahead(net, opt, cfg["epochs"] * steps_per_epoch,
                                    every=cfg["lookahead_every"], max_decay=cfg["lookahead_decay"])
    device = resolve_device(cfg["device"]) if parallel is None else parallel.device
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if parallel is None or parallel.writes:
        procs = "" if parallel is None else f" x {parallel.world} processes"
        print(f"{model} recipe {cfg['recipe']} on {device}{procs}: epochs {cfg['epochs']}, batch "
              f"{cfg['batch_size']}, lr {cfg['lr']}, bf16 {cfg['bf16']}, channels_last "
              f"{cfg['channels_last']}, run dir {run_dir}", file=sys.stderr)
    resume_cmd = f"python -m experiments.{model} --resume {run_dir}"
    result, code = guarded(lambda: fit(
        cfg, net=net, opt=opt, loss_fn=build_loss(cfg), train=train, val=val, test=test,
        augment=augmenter(cfg), prepare=prepare, run_dir=run_dir, resume=resume,
        max_epochs=args.max_epochs, resume_command=resume_cmd, parallel=parallel, hooks=hooks))
    if code is not None:
        return code
    if result.status == "interrupted":
        return 130
    if parallel is not None and not parallel.writes:
        return 0
    if result.status == "stopped":
        print(f"stopped after epoch {args.max_epochs}; continue with: {resume_cmd}", file=sys.stderr)
    else:
        last = result.history[-1] if result.history else {}
        print(json.dumps({k: last.get(k) for k in ("epoch", "val_accuracy", "test_accuracy")}))
    return 0
