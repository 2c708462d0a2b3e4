"""Pictures of a trained net, saved as PNGs: first-layer filters as RGB tiles, last-conv-layer
filters channel by channel, weight histograms per layer, and feature maps of an image.

The command line only; the study itself is :mod:`experiments.report.filters`.

    python -m experiments.visualize --checkpoint runs/x --image cat.png     # into runs/x/figures/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .catalog import feature_layers, load_trained
from .report.filters import (feature_map_grid, feature_maps, filter_figures, input_image,
                             save_png, weight_histograms)
from .train.commands import refusal
from .train.registry import NET_BUILDERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.visualize",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes first_layer_filters.png, last_conv_filters.png, "
                                       "weight_histograms.png, input.png and feature_maps_<layer>.png.")
    a = p.add_argument
    a("--checkpoint", required=True,
      help="a run folder (runs/<name>), our .safetensors checkpoint or a torchvision VGG16 .pth")
    a("--model", help=f"net of a checkpoint whose metadata names none ({', '.join(NET_BUILDERS)})")
    a("--image", help="image for the feature maps (default: CIFAR-10 test image --cifar-index)")
    a("--cifar-index", type=int, default=0,
      help="CIFAR-10 test image when no --image; only that image is decoded (default: 0)")
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--resize", type=int, help="shorter side before the centre crop (default: 256 for VGG16, 32)")
    a("--layers", nargs="*", help="leaf layers for feature maps (default: the first and last ReLU)")
    a("--max-channels", type=int, default=16, help="feature-map channels shown (default: 16)")
    a("--scale", type=int, default=8, help="filter tile enlargement before the picture is "
                                          "enlarged to at least 512 px wide (default: 8)")
    a("--prefix", default="", help="prefix of the PNG names")
    a("--out", help="folder for the PNGs (default: figures/ in the run folder, or next to the "
                    "checkpoint file)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # everything that can refuse the input comes before the first write
        run = load_trained(args.checkpoint, model=args.model).single(
            "visualize", "evaluate reports each member")
        params, state = run.params, run.state
        chosen = args.layers or feature_layers(run, "--layers")
        x, shown = input_image(run.image_kind, args.image, resize=args.resize,
                               data_dir=args.data_dir, cifar_index=args.cifar_index)
        maps = feature_maps(run.net, params, state, x, chosen)
    except (ValueError, FileNotFoundError, OSError, IndexError) as err:
        return refusal(err)
    path = run.path
    out = Path(args.out) if args.out else path.parent / "figures"
    out.mkdir(parents=True, exist_ok=True)
    png = lambda what: out / f"{args.prefix}{what}.png"  # noqa: E731
    written = [save_png(image, png(what), title=title)
               for what, (image, title) in filter_figures(params, scale=args.scale).items()]
    weight_histograms(params, png("weight_histograms"), title=str(args.checkpoint))
    written.append(png("weight_histograms"))
    up = max(1, 128 // shown.shape[0])
    written.append(save_png(shown.repeat(up, 0).repeat(up, 1), png("input")))
    for name, f in maps.items():
        scale = max(1, 128 // f.shape[-1])
        written.append(save_png(feature_map_grid(f, max_channels=args.max_channels, scale=scale),
                                png(f"feature_maps_{name.replace('.', '_')}")))
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
