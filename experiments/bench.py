"""Speed, measured side by side: the pure training step against the torch.nn + torch.optim loop.

The command line only; the study itself is :mod:`experiments.benchmarks.steps`.

    python -m experiments.bench [--quick] [--models a,b,c] [--reps N] [--device auto|cpu|cuda]
                                [--write [--out docs/performance.md]]

It prints the report; only ``--write`` writes it (to docs/performance.md unless ``--out``), so a
trial run, ``--quick`` included, never replaces the committed file.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from nets.checkpoint import atomic_write

from .benchmarks.layers import bench_layers
from .benchmarks.ensembles import VARIANTS, bench_ensembles, render_ensembles
from .benchmarks.pipeline import bench_pipeline
from .benchmarks.steps import BENCHED_NETS, CONFIGS, bench_steps, kept_notes, render
from .benchmarks.timing import machine_info, matmul_peak
from .train import resolve_device, retain_freed_memory


#: The committed report, which ``--write`` (re)writes.
DEFAULT_OUT = "docs/performance.md"


def _parse_models(text: str) -> list[str]:
    models = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in models if m not in BENCHED_NETS]
    if not models or bad:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(BENCHED_NETS)}, got {text!r}")
    return models


def _comma_list(allowed):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(m.strip().lower() for m in text.split(",") if m.strip())
        if not items or any(m not in allowed for m in items):
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}, got {text!r}")
        return items
    return parse


def _comma_ints(text: str) -> tuple[int, ...]:
    try:
        items = tuple(int(m) for m in text.split(",") if m.strip())
    except ValueError:
        items = ()
    if not items or any(m < 1 for m in items):
        raise argparse.ArgumentTypeError(f"expected a comma list of whole numbers >= 1, got {text!r}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in under a minute: Model A only, few rounds, small sizes")
    p.add_argument("--models", type=_parse_models, default=None,
                   help="comma list of a, b, c, tutorial (default: a,b,c; --quick: a); the tutorial net's "
                        "step is the report's at --batch 32")
    p.add_argument("--reps", type=int, default=None,
                   help="interleaved rounds per measurement (default 7; --quick 2)")
    p.add_argument("--batch", type=int, default=128, help="training batch size (default 128)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: os.cpu_count(); fewer helps only when other "
                        "processes load the cores)")
    p.add_argument("--skip", default="",
                   help="comma list of parts to leave out: steps, layers, pipeline, ensembles, compile")
    p.add_argument("--ensemble-models", type=_comma_list(("tutorial", "a")), default=None,
                   help="the ensemble part's nets, a comma list of tutorial, a (default: both; "
                        "--quick: tutorial)")
    p.add_argument("--members", type=_comma_ints, default=None,
                   help="the ensemble part's member counts K, a comma list (default 1,2,4,8,16; "
                        "--quick 1,2)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.add_argument("--allocator", choices=("retain", "default"), default="retain",
                   help="retain: keep freed memory in the process, as the experiments do "
                        "(experiments/train/device.py; glibc only); default: glibc's own policy")
    p.add_argument("--write", action="store_true",
                   help="write the report to --out too (default: only print it)")
    p.add_argument("--out", help=f"where --write writes the report (default: {DEFAULT_OUT}); "
                                 "hand-written notes below the file's notes marker are kept")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is not None and not args.write:
        parser.error(f"--out {args.out}: expected --write too (without it the report is only "
                     "printed)")
    start = time.perf_counter()
    retained = args.allocator == "retain" and retain_freed_memory()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    quick = args.quick
    models = args.models or (["a"] if quick else ["a", "b", "c"])
    rounds = args.reps or (2 if quick else 7)
    if rounds < 1 or args.batch < 1:
        raise SystemExit(f"error: expected --reps and --batch >= 1, got {rounds}, {args.batch}")
    configs = tuple(c for c in CONFIGS if not (c.compile and (quick or "compile" in skip)))
    info = machine_info(device)
    print(f"bench on {info['cpu']} ({info['cores']} cores), device {device}, torch {info['torch']}",
          file=sys.stderr)
    n = 1024 if quick else 2048
    peaks = {"fp32": matmul_peak(torch.float32, device, n=n, reps=rounds + 2),
             "bf16": matmul_peak(torch.bfloat16, device, n=n, reps=rounds + 2)}
    print("matmul peak: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()),
          file=sys.stderr)
    steps, step_peaks = {}, {}
    for model in [] if "steps" in skip else models:
        steps[model], step_peaks[model] = bench_steps(model, args.batch, rounds, device, configs,
                                                      matmul_n=n)
        for r in steps[model]:
            print(f"  model {model.upper()} {r['label']:>48}: {r['img_s']:8.1f} img/s "
                  f"{r['ratio']:5.2f}x (1), {r['peer_ratio']:5.2f}x best torch.nn, {100 * r['peak_fraction']:3.0f}% of {r['dtype']} peak",
                  file=sys.stderr)
    layer_rows = [] if "layers" in skip else bench_layers(16 if quick else args.batch, rounds, device)
    pipeline = {} if "pipeline" in skip else bench_pipeline(1024 if quick else 10240, args.batch,
                                                            rounds, device)
    ensembles = [] if "ensembles" in skip else bench_ensembles(
        models=args.ensemble_models or (("tutorial",) if quick else ("tutorial", "a")),
        ks=args.members or ((1, 2) if quick else (1, 2, 4, 8, 16)), rounds=rounds, device=device,
        steps=1 if quick else 3,
        variants=tuple(v for v in VARIANTS if not (v.endswith("compile") and (quick or "compile" in skip))))
    command = "python -m experiments.bench" + "".join(" " + shlex.quote(a) for a in argv)
    text = render(command=command, info=info, peaks=peaks, step_peaks=step_peaks, steps=steps, layer_rows=layer_rows,
                  pipeline=pipeline, batch=args.batch, rounds=rounds,
                  seconds=time.perf_counter() - start, retained=retained)
    if ensembles:
        text += "\n" + "\n".join(render_ensembles(ensembles, 32, rounds))
    print(text)
    if args.write:
        out = Path(args.out or DEFAULT_OUT)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text + "\n" + kept_notes(out))
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
