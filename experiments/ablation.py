"""Table 1 of the report as a measured ablation: each method changed alone, seeds vmapped.

The command line only; the study is :mod:`experiments.ensembles.ablation`.

    python -m experiments.ablation --model a --seeds 3 --epochs 10
    python -m experiments.ablation --model b --seeds 3 --epochs 10      # rerun to continue
    python -m experiments.ablation --model b --seeds 3 --epochs 20      # 10 more epochs each
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from .cifar.recipes import load_data, resolve_data_dir
from .common.settings import SettingsError, whole_number
from .data.cifar10 import DataNotFoundError
from .ensembles.ablation import (COMMAND, ablation_rows, format_ablation, open_variants,
                                 run_ablation, variant_configs, write_ablation)
from .ensembles.config import ABLATION_MODEL_FLAGS, AblationConfig
from .ensembles.grid import check_grid
from .train import MAX_MEMBERS, retain_freed_memory
from .train.commands import add_data_flags, refusal
from .train.lifecycle import EXIT_OK, RunRefused, run_folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/sweeps.md.")
    a = p.add_argument
    d = AblationConfig()
    a("--model", choices=sorted(ABLATION_MODEL_FLAGS), required=True, help="the report's model")
    a("--seeds", type=int, default=d.seeds,
      help=f"seeds per variant, trained as one ensemble (default: {d.seeds})")
    a("--epochs", type=int, default=d.epochs, help=f"epochs per variant (default: {d.epochs}; the report: 20)")
    add_data_flags(p)
    a("--name", help="folder of the variants (default: ablation-<model>)")
    a("--max-epochs", type=int, help="stop (resumably) after this many epochs of a variant")
    return p


def continue_command(argv: Sequence[str]) -> str:
    """The command line that continues this ablation: the same one, without ``--max-epochs``
    (which would stop again where it stopped)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--max-epochs":
            skip = True
        elif not arg.startswith("--max-epochs="):
            kept.append(arg)
    return " ".join([COMMAND, *map(shlex.quote, kept)])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        study = AblationConfig(model=ABLATION_MODEL_FLAGS[args.model], seeds=args.seeds,
                               epochs=args.epochs, val_split=str(args.val_split),
                               limit_per_class=args.limit_per_class, data_dir=args.data_dir,
                               device=args.device)
        check_grid({}, study.seeds, MAX_MEMBERS)
        if args.max_epochs is not None:
            whole_number(args.max_epochs, "max_epochs")
        study = resolve_data_dir(study)
        folder = args.name or f"ablation-{args.model}"
        out = run_folder(args.out, folder)
        configs = variant_configs(study, folder)   # every variant's settings checked first
        runs = open_variants(configs, out, continue_command(argv))   # writes nothing
        train, val, test = load_data(configs[0][1])
        for name, cfg in configs:
            if cfg.batch_size > len(train.labels):
                raise SettingsError(f"variant {name!r}: expected a batch of {cfg.batch_size} to fit "
                                    f"in the {len(train.labels)} training images (raise "
                                    "--limit-per-class)")
    except (SettingsError, RunRefused, DataNotFoundError, FileNotFoundError) as err:
        return refusal(err)
    retain_freed_memory()
    _, code = run_ablation([(name, run) for (name, _), run in zip(configs, runs)], train=train,
                           val=val, test=test, max_epochs=args.max_epochs)
    if code != EXIT_OK or not all((run.dir / "checkpoint.safetensors").is_file() for run in runs):
        return code
    try:   # the table is the folders', never the flags'
        rows = ablation_rows(configs, out)
    except RunRefused as err:
        return refusal(err)
    if any(r["epochs"] < cfg.epochs for r, (_, cfg) in zip(rows, configs)):
        return code   # stopped at --max-epochs: the table waits for every variant
    write_ablation(out, study.model, rows)
    print(format_ablation(rows, study.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
