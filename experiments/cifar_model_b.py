"""Model B on CIFAR-10: the project's main job (not built yet)."""
import sys

if __name__ == "__main__":
    sys.exit("experiments.cifar_model_b is not built yet (issue 5): the training engine and the "
             "CIFAR-10 experiments have not landed.")
