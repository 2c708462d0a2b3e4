"""Model B (VGG-like, 64-128-256 widths, batch norm, dropout, Xavier init) on CIFAR-10.

    python -m experiments.cifar_model_b                    # fast recipe, data from $CIFAR10_DIR
    python -m experiments.cifar_model_b --recipe report    # the report's conditions
    python -m experiments.cifar_model_b --resume runs/cifar_model_b-fast-s0

See docs/training.md for the recipes and every flag.
"""
import sys

from .cifar.cli import main

DESCRIPTION = "Model B (VGG-like, 64-128-256 widths, batch norm, dropout, Xavier init) on CIFAR-10."

if __name__ == "__main__":
    sys.exit(main("cifar_model_b", DESCRIPTION))
