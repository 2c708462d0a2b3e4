"""Figures of a run's layer internals: telemetry heatmaps, gradient flow, activation histograms
and feature maps.

The command line only; the figures are :mod:`experiments.report.inspect`.

    python -m experiments.cifar_model_b --telemetry 25 ...      # a run with telemetry
    python -m experiments.inspect runs/<name> [--layer features.2] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .catalog import feature_layers, load_trained
from .cifar.recipes import prepare
from .common.settings import whole_number
from .data.cifar10 import find_data_dir, load_cifar10
from .report.filters import feature_map_grid, feature_maps, input_image, save_png
from .report.inspect import plot_activation_histograms, plot_gradient_flow, plot_heatmaps
from .train.commands import refusal
from .train.telemetry import TELEMETRY, read_telemetry, watched


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.inspect", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/training.md (telemetry).")
    a = p.add_argument
    a("run", help="a run folder (runs/<name>)")
    a("--layer", action="append", help="layer(s) for feature maps (default: the first ReLU and the "
                                      "last one of the convolutions)")
    a("--images", type=int, default=256, help="test images for the histograms (default: 256)")
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--out", help="folder for the PNGs (default: <run>/figures)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "figures"
    try:
        whole_number(args.images, "images")
        rows = read_telemetry(run / TELEMETRY, 10**9, 0)
        loaded = load_trained(run).single("inspect", "evaluate reports each member")
        net, params, state = loaded.net, loaded.params, loaded.state
        x, _ = input_image(loaded.image_kind, None, data_dir=args.data_dir, cifar_index=0)
        names = watched(net)
        chosen = args.layer or feature_layers(loaded, "--layer")
        maps = feature_maps(net, params, state, x, chosen)
        per_class = max(1, args.images // 10)
        batch = load_cifar10(find_data_dir(args.data_dir, download=False), "test",
                             limit_per_class=per_class, progress=False)
    except (ValueError, FileNotFoundError, OSError, IndexError) as err:
        return refusal(err)
    title = run.name
    written = []
    if rows:
        written += [plot_heatmaps(rows, out / "telemetry_heatmaps.png", title),
                    plot_gradient_flow(rows, out / "gradient_flow.png", title)]
    else:
        print(f"{run} has no {TELEMETRY} (train with --telemetry); drawing the rest", file=sys.stderr)
    written.append(plot_activation_histograms(net, params, state, prepare(batch.images), names,
                                              out / "activation_histograms.png", title))
    for name, fmap in maps.items():
        written.append(save_png(feature_map_grid(fmap, scale=max(1, 128 // fmap.shape[-1])),
                                out / f"feature_maps_{name.replace('.', '_')}.png",
                                title=f"{name} {tuple(fmap.shape)}"))
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
