"""Table 1 of the report as a measured ablation: each method changed alone, seeds vmapped.

The command line only; the study is :mod:`experiments.ensembles.ablation`.

    python -m experiments.ablation --model a --seeds 3 --epochs 10
    python -m experiments.ablation --model b --seeds 3 --epochs 10      # rerun to resume
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .cifar.recipes import check_config, load_data
from .data.cifar10 import DataNotFoundError
from .ensembles.ablation import run_ablation, variant_config, variants
from .ensembles.grid import check_grid
from .train import MAX_MEMBERS, retain_freed_memory
from .train.commands import add_data_flags, guarded, refusal

MODELS = {"a": "cifar_model_a", "b": "cifar_model_b", "c": "cifar_model_c"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.ablation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/sweeps.md.")
    a = p.add_argument
    a("--model", choices=sorted(MODELS), required=True, help="the report's model")
    a("--seeds", type=int, default=3, help="seeds per variant, trained as one ensemble (default: 3)")
    a("--epochs", type=int, default=10, help="epochs per variant (default: 10; the report: 20)")
    add_data_flags(p)
    a("--name", help="folder of the variants (default: ablation-<model>)")
    a("--max-epochs", type=int, help="stop (resumably) after this many epochs of a variant")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = MODELS[args.model]
    base = dict(val_split=str(args.val_split), limit_per_class=args.limit_per_class,
                data_dir=args.data_dir, device=args.device, test=True, bf16=False,
                channels_last=False, compile=False)
    try:
        check_grid({}, args.seeds, MAX_MEMBERS)
        configs = [(name, variant_config(model, changes, seeds=args.seeds, epochs=args.epochs,
                                         base=base)) for name, changes in variants(model)]
        for _, cfg in configs:   # every variant's values before any training
            check_config(cfg)
        if args.max_epochs is not None and args.max_epochs < 1:
            raise ValueError(f"--max-epochs: expected a whole number >= 1, got {args.max_epochs}")
        train, _, _ = load_data(dict(cfg, test=False), progress=False)   # the data exists
        for name, cfg in configs:
            if cfg["batch_size"] > len(train.labels):
                raise ValueError(f"variant {name!r}: expected a batch of {cfg['batch_size']} to fit "
                                 f"in the {len(train.labels)} training images (raise "
                                 "--limit-per-class)")
    except (ValueError, FileNotFoundError, DataNotFoundError) as err:
        return refusal(err)
    retain_freed_memory()
    out = Path(args.out) / (args.name or f"ablation-{args.model}")
    rows, code = guarded(lambda: run_ablation(model, seeds=args.seeds, epochs=args.epochs, base=base,
                                              out=out, load_data=load_data, max_epochs=args.max_epochs))
    if code is not None:
        return code
    if (out / "ablation.md").is_file() and len(rows) == len(variants(model)):
        print((out / "ablation.md").read_text())
        return 0
    print(f"stopped; rerun the same command to continue ({out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
