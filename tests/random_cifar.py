"""Small generated CIFAR-10 folders for the command-line tests."""
import torch
from PIL import Image

from experiments.data.cifar10 import CIFAR10_CLASSES


def write_random_images(folder, n: int, generator: torch.Generator) -> None:
    """``n`` random 32x32 RGB PNGs ``0.png .. {n-1}.png`` in ``folder`` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    x = torch.randint(0, 256, (n, 32, 32, 3), generator=generator, dtype=torch.uint8)
    for i in range(n):
        Image.fromarray(x[i].numpy()).save(folder / f"{i}.png")


def write_random_cifar(root, train_per_class: int, test_per_class: int):
    """An image-folder CIFAR-10 under ``root``: ``train/<class>/<i>.png`` and ``test/...``, random
    pixels from one generator seeded 0, drawn split by split and class by class (so the same
    counts always give the same images). Returns ``root``."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in CIFAR10_CLASSES:
            write_random_images(root / split / c, n, g)
    return root
