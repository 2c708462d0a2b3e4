"""Model B trained with optax inside one jax.jit, through nets.jax_apply (torchax), checked
against the torch step on the first steps and timed against it.

    python -m experiments.jax_train                              # 3 epochs on 2,560 images
    python -m experiments.jax_train --epochs 1 --limit-per-class all --out runs/jax_train.json
    python -m experiments.jax_train --agreement                  # one step of A, B, C, VGG16 vs torch

Needs the extra purenn[torchax] and CIFAR-10 ($CIFAR10_DIR or --data-dir). See docs/jax.md.
"""
import argparse
import json
import sys

from .common.files import write_json
from .common.settings import SettingsError
from .data.cifar10 import DataNotFoundError
from .jax import JaxTrainConfig, check_record_path, run
from .jax.agreement import NETS, agreement_table
from .train.commands import refusal
from .train.lifecycle import EXIT_DIVERGED, EXIT_INTERRUPTED, NonFiniteLossError, RunRefused


def per_class(text: str):
    """``--limit-per-class``'s value: a count, or ``all`` (None: the whole split). ``0`` is
    passed on, and the config refuses it as every command does."""
    if text.lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or all, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = JaxTrainConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.jax_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    a("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    a("--limit-per-class", type=per_class, default=d.limit_per_class, metavar="N",
      help=f"train on the first N images of each class, all for all (default {d.limit_per_class})")
    a("--test-limit-per-class", type=per_class, default=d.test_limit_per_class, metavar="N",
      help=f"test on the first N images of each class, all for all (default {d.test_limit_per_class})")
    a("--seed", type=int, default=d.seed, help="run key seed: init, order, augmentation, dropout")
    a("--lr", type=float, help="peak learning rate (default: the fast recipe's, scaled to the batch)")
    a("--check-steps", type=int, default=d.check_steps,
      help=f"run the torch step alongside for the first N steps (default {d.check_steps})")
    a("--dtype", default=d.dtype, choices=("float32", "float64"), help="parameter and input dtype")
    a("--impl", default=d.impl, choices=("fast", "explicit"), help="layers' formulation")
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--out", help="also write the record as JSON here (a file holding a record of other "
                    "settings is refused and left as it was)")
    a("--agreement", nargs="*", metavar="NET",
      help="instead of training: one training step of each NET (default: all of "
           f"{', '.join(NETS)}) through nets.jax_apply against torch, in float64 and float32")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.agreement is not None:
        try:
            rows = agreement_table(args.agreement)
        except ValueError as err:
            return refusal(err)
        if args.out:
            write_json(args.out, {"agreement": rows})
        return 0
    try:
        cfg = JaxTrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                             limit_per_class=args.limit_per_class,
                             test_limit_per_class=args.test_limit_per_class, seed=args.seed,
                             lr=args.lr, check_steps=args.check_steps, dtype=args.dtype,
                             impl=args.impl, data_dir=args.data_dir)
        if args.out:
            check_record_path(args.out, cfg)
        record = run(cfg)
    except (SettingsError, RunRefused, DataNotFoundError) as err:
        return refusal(err)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("interrupted: nothing written (the record is written when the run ends)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.out:
        write_json(args.out, record)
    print(json.dumps(record, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
