"""The command line of the three CIFAR-10 experiments (``python -m experiments.cifar_model_b``).

:func:`main` parses the flags and lays them over the recipe (a new run) or over the run's stored
config (``--resume``); the typed config checks every value, and the run lifecycle
(:mod:`experiments.train.lifecycle`) decides new, resume, continue or refuse before anything is
written. Every refusal is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..common.settings import whole_number
from ..data.cifar10 import DataNotFoundError
from ..report.plots import plot_run
from ..train import distributed, fit, resolve_device, retain_freed_memory
from ..train.build import build_loss, build_optimizer
from ..train.commands import refusal
from ..train.lifecycle import RunRefused, open_run, resumed_config, run_folder
from ..train.lookahead import with_lookahead
from ..train.telemetry import DEFAULT_EVERY
from .config import CifarConfig, RECIPES, recipe
from .recipes import augmenter, build_net, load_data, prepare, resolve_data_dir
from .speed import benchmark

__all__ = ["build_parser", "requested_config", "main"]

#: Flags that set a setting of the same name (``--batch-size`` -> ``batch_size``).
SETTING_FLAGS = ("epochs", "batch_size", "lr", "seed", "device", "val_split", "limit_per_class",
                 "label_smoothing", "weight_decay", "bf16", "channels_last", "compile", "crop",
                 "flip", "tta_flip", "tta_shift", "cutout", "retain_freed_memory", "telemetry",
                 "sync_bn", "lookahead", "lookahead_every", "bn_momentum", "bn_eps", "whiten_init",
                 "data_dir")


def build_parser(model: str, description: str) -> argparse.ArgumentParser:
    """The shared command line; every setting flag defaults to None = "take it from the recipe"
    (a new run) or "from the run" (``--resume``)."""
    defaults = CifarConfig()
    p = argparse.ArgumentParser(prog=f"python -m experiments.{model}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Recipes: " + "; ".join(
                                    f"{r}: " + ", ".join(f"{k}={v}" for k, v in cfg.to_json().items()
                                                         if getattr(defaults, k) != getattr(cfg, k)
                                                         and k not in ("model", "recipe"))
                                    for r, cfg in RECIPES[model].items()))
    a = p.add_argument
    a("--recipe", choices=sorted(RECIPES[model]),
      help="hyperparameter set of a new run (default: fast); see docs/training.md")
    a("--epochs", type=int, help="training epochs")
    a("--batch-size", type=int, help="images per step (SGD lr is scaled linearly with it "
                                     "unless --lr is given)")
    a("--lr", type=float, help="(peak) learning rate")
    a("--seed", type=int, help="seed of the run key: init, split, shuffling, augmentation, dropout")
    a("--device", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    a("--out", help="folder holding the run folders (default: runs)")
    a("--name", help="run folder name (default: <model>-<recipe>-s<seed>)")
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--val-split", help="validation images carved from train: a fraction (0.1) or a count "
                          "(5000); 0 for none")
    a("--limit-per-class", type=int, help="use only the first N images of each class (smoke runs)")
    a("--resume", metavar="RUN_DIR", help="continue runs/<name> from its last checkpoint, with "
                                          "its saved settings (a flag that changes one is refused "
                                          "unless the run can soundly continue with it)")
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




def _given(args: argparse.Namespace) -> dict:
    """The settings the command line sets: the flags that were given."""
    given = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k) is not None}
    if "val_split" in given:
        given["val_split"] = str(given["val_split"])
    if args.no_test:
        given["test"] = False
    return given


def requested_config(model: str, args: argparse.Namespace) -> tuple[CifarConfig, Path, bool]:
    """``(config, run folder, resume)`` the flags ask for; SettingsError / RunRefused (one line).

    A new run is the recipe with the given flags laid over it (SGD's learning rate scaled
    linearly with ``--batch-size`` unless ``--lr`` is given). ``--resume`` lays them over the
    run's stored config; the lifecycle then continues or refuses."""
    given = _given(args)
    if args.max_epochs is not None:
        whole_number(args.max_epochs, "max_epochs")
    if args.resume:
        cfg = resumed_config(args.resume, CifarConfig, given,
                             own={"recipe": args.recipe, "name": args.name, "out": args.out})
        if cfg.model != model:
            raise RunRefused(f"{args.resume} is a run of experiments.{cfg.model}, not of "
                             f"experiments.{model}")
        return cfg, Path(args.resume), True
    base = recipe(model, args.recipe or "fast")
    if "batch_size" in given and "lr" not in given and base.optimizer == "sgd":
        whole_number(given["batch_size"], "batch_size")
        given["lr"] = base.lr * given["batch_size"] / base.batch_size   # linear scaling rule
    seed = given.get("seed", base.seed)
    cfg = base.replace(**given, name=args.name or f"{model}-{base.recipe}-s{seed}")
    run_dir = run_folder(args.out or "runs", cfg.name)
    # torchrun --max-restarts restarts the workers: the restart resumes the run this command began.
    restarted = distributed.restart_count() > 0 and run_dir.joinpath("checkpoint.safetensors").exists()
    return cfg, run_dir, restarted


def main(model: str, description: str, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train (or resume), print the final table; returns the exit status.

    Under ``torchrun`` every process runs this: all of them train, rank 0 alone writes and
    prints (docs/distributed.md).
    """
    args = build_parser(model, description).parse_args(argv)
    writes = distributed.launched_rank() == 0
    try:
        cfg, run_dir, resume = requested_config(model, args)
        if args.benchmark:
            if cfg.retain_freed_memory:
                retain_freed_memory()
            print(json.dumps(benchmark(cfg, args.benchmark)))
            return 0
        distributed.check_launched_world(cfg.batch_size)
        resolve_device(cfg.device)   # this machine has it: refused before anything is written
        cfg = resolve_data_dir(cfg)
        run = open_run(run_dir, cfg, command=f"python -m experiments.{model}", resume=resume)
        if resume and not args.resume and writes:
            print(f"torchrun restart {distributed.restart_count()}: resuming {run_dir}", file=sys.stderr)
    except (ValueError, DataNotFoundError, FileNotFoundError) as err:   # SettingsError, RunRefused
        return refusal(err, writes=writes)
    try:
        parallel = distributed.start(cfg, backend=args.dist_backend, timeout_s=args.dist_timeout)
    except (ValueError, distributed.StartError) as err:
        return refusal(err, writes=writes)
    try:
        code = _train(run, args, parallel)
    finally:
        distributed.stop(parallel)
    return distributed.exit_now(parallel, code)


def _train(run, args, parallel) -> int:
    """Load the data, build the run's parts and call :func:`fit`; the exit status."""
    cfg, writes = run.config, parallel is None or parallel.writes
    problem = None
    try:
        train, val, test = load_data(cfg, say=writes)
    except (DataNotFoundError, FileNotFoundError, ValueError) as err:
        problem = err
    if problem is None and len(train.labels) // cfg.batch_size < 1:
        problem = (f"--batch-size {cfg.batch_size}: expected at most the {len(train.labels)} "
                   "training images (lower --batch-size, or raise --limit-per-class)")
    # Every rank decides before any writes: one that refuses stops them all.
    if parallel is not None and not parallel.all_ok(problem is None) and problem is None:
        problem = f"distributed: rank {parallel.rank} stops: another rank refused (its error is above)"
    if problem is not None:
        return refusal(problem, writes=writes)
    steps_per_epoch = len(train.labels) // cfg.batch_size
    if cfg.retain_freed_memory:
        retain_freed_memory()
    net = build_net(cfg, len(train.classes), None if run.resumed else train.images)
    opt = build_optimizer(cfg, steps_per_epoch)
    hooks = None
    if cfg.lookahead:
        opt, hooks = with_lookahead(net, opt, cfg.epochs * steps_per_epoch,
                                    every=cfg.lookahead_every, max_decay=cfg.lookahead_decay)
    device = resolve_device(cfg.device) if parallel is None else parallel.device
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if writes:
        procs = "" if parallel is None else f" x {parallel.world} processes"
        print(f"{cfg.model} recipe {cfg.recipe} on {device}{procs}: epochs {cfg.epochs}, batch "
              f"{cfg.batch_size}, lr {cfg.lr}, bf16 {cfg.bf16}, channels_last "
              f"{cfg.channels_last}, run dir {run.dir}", file=sys.stderr)
        if run.resumed and parallel is not None:
            print(distributed.batch_norm_note(cfg, parallel), file=sys.stderr)
    run.after_epoch.append(plot_run)
    result, code = run.guarded(lambda: fit(
        cfg, net=net, opt=opt, loss_fn=build_loss(cfg), train=train, val=val, test=test,
        augment=augmenter(cfg), prepare=prepare, run=run, max_epochs=args.max_epochs,
        parallel=parallel, hooks=hooks))
    if code != 0 or not writes or result.status != "done":
        return code
    last = result.history[-1] if result.history else {}
    print(json.dumps({k: last.get(k) for k in ("epoch", "val_accuracy", "test_accuracy")}))
    return 0
