"""Model A of the report (two VGG blocks of 64 and 128 channels, an MLP head) on CIFAR-10.

    python -m experiments.cifar_model_a                    # fast recipe, data from $CIFAR10_DIR
    python -m experiments.cifar_model_a --recipe report    # the report's conditions
    python -m experiments.cifar_model_a --resume runs/cifar_model_a-fast-s0

See docs/training.md for the recipes and every flag.
"""
import sys

from .cifar.cli import main

DESCRIPTION = "Model A of the report (two VGG blocks of 64 and 128 channels, an MLP head) on CIFAR-10."

if __name__ == "__main__":
    sys.exit(main("cifar_model_a", DESCRIPTION))
