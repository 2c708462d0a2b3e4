"""Model C (Model B with a third conv in blocks 2 and 3) on CIFAR-10.

    python -m experiments.cifar_model_c                    # fast recipe, data from $CIFAR10_DIR
    python -m experiments.cifar_model_c --recipe report    # the report's conditions
    python -m experiments.cifar_model_c --resume runs/cifar_model_c-fast-s0

See docs/training.md for the recipes and every flag.
"""
import sys

from .cifar.cli import main

DESCRIPTION = "Model C (Model B with a third conv in blocks 2 and 3) on CIFAR-10."

if __name__ == "__main__":
    sys.exit(main("cifar_model_c", DESCRIPTION))
