"""Caltech-256 from its image-folder tree: classes, the report's per-class split, VGG preprocessing.

The tree is ``256_ObjectCategories/NNN.name/*.jpg`` (``001.ak47`` ... ``256.toad``, and
``257.clutter``, the background class). Classes are ordered by their number ``NNN`` and labelled
``0 .. K-1`` in that order; the clutter class is left out unless asked for.

Split (the report's): from each class, ``train_per_class`` (32) training and ``test_per_class``
(8) test images, drawn without overlap by ``permutation(fold_in(key(seed), NNN), count)`` over
the class's files sorted by name: the first 32 are training images, the next 8 test images. So
the split depends only on the seed, the class number and the file names (not on the order the
file system lists them, nor on which other classes are present). A class with fewer than
``train_per_class + test_per_class`` images is an error naming it (every class of the real
Caltech-256 has at least 80, so a short class means an incomplete copy).

Preprocessing (VGG / torchvision's ImageNet recipe): resize the shorter side to 256 (bilinear,
antialiased), centre crop 224x224, scale to [0, 1], normalise with the ImageNet mean and std.
Greyscale and CMYK images (Caltech-256 has some) are converted to RGB first.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch

from layers import random as jr
from layers._checks import check_positive_int

from .augment import normalize

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CLUTTER", "CaltechClass", "Split", "find_root",
           "list_classes", "split_per_class", "load_image", "image_batches", "imagenet_normalize",
           "files_digest"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Number of the background ("clutter") class.
CLUTTER = 257
_FOLDER = "256_ObjectCategories"
_CLASS_DIR = re.compile(r"^(\d{3})\.(.+)$")
_SUFFIXES = (".jpg", ".jpeg", ".png")


class CaltechClass(NamedTuple):
    """One class folder: its number ``NNN``, its name and its image files sorted by name."""

    number: int
    name: str
    files: tuple[Path, ...]


class Split(NamedTuple):
    """Training and test files with labels ``0 .. K-1`` (index into ``classes``)."""

    train_files: tuple[Path, ...]
    train_labels: torch.Tensor
    test_files: tuple[Path, ...]
    test_labels: torch.Tensor
    classes: tuple[str, ...]


def find_root(root: str | os.PathLike) -> Path:
    """The folder holding the ``NNN.name`` class folders: ``root`` or ``root/256_ObjectCategories``."""
    root = Path(root)
    for cand in (root / _FOLDER, root):
        if cand.is_dir() and any(_CLASS_DIR.match(p.name) and p.is_dir() for p in cand.iterdir()):
            return cand
    raise FileNotFoundError(f"caltech: expected {root} or {root / _FOLDER} to hold class folders "
                            "named NNN.name (e.g. 001.ak47), found none")


def list_classes(root: str | os.PathLike, *, include_clutter: bool = False) -> list[CaltechClass]:
    """The class folders under ``root`` (see :func:`find_root`), ordered by number."""
    base = find_root(root)
    out = []
    for d in base.iterdir():
        m = _CLASS_DIR.match(d.name)
        if not m or not d.is_dir():
            continue
        number = int(m.group(1))
        if number == CLUTTER and not include_clutter:
            continue
        files = tuple(sorted(f for f in d.iterdir()
                             if f.is_file() and f.suffix.lower() in _SUFFIXES))
        out.append(CaltechClass(number, m.group(2), files))
    numbers = [c.number for c in out]
    if len(set(numbers)) != len(numbers):
        dup = sorted({n for n in numbers if numbers.count(n) > 1})
        raise ValueError(f"caltech: expected one folder per class number, got several for {dup}")
    return sorted(out)


def split_per_class(classes: Sequence[CaltechClass], *, train_per_class: int = 32,
                    test_per_class: int = 8, seed: int = 0) -> Split:
    """The report's split: ``train_per_class`` + ``test_per_class`` images of every class, drawn
    by ``permutation(fold_in(key(seed), number), count)`` (see the module docstring)."""
    where = "split_per_class"
    for name, v in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        check_positive_int(v, where, name)
    if not classes:
        raise ValueError(f"{where}: expected at least one class, got none")
    need = train_per_class + test_per_class
    short = [f"{c.number:03d}.{c.name} ({len(c.files)} images)" for c in classes if len(c.files) < need]
    if short:
        raise ValueError(f"{where}: expected at least {need} images per class ({train_per_class} "
                         f"train + {test_per_class} test), got fewer in {', '.join(short)}")
    root = jr.key(seed)
    tr_f, tr_y, te_f, te_y = [], [], [], []
    for label, c in enumerate(classes):
        perm = jr.permutation(jr.fold_in(root, c.number), len(c.files)).tolist()
        tr_f += [c.files[i] for i in perm[:train_per_class]]
        te_f += [c.files[i] for i in perm[train_per_class:need]]
        tr_y += [label] * train_per_class
        te_y += [label] * test_per_class
    return Split(tuple(tr_f), torch.tensor(tr_y), tuple(te_f), torch.tensor(te_y),
                 tuple(f"{c.number:03d}.{c.name}" for c in classes))


def load_image(path: str | os.PathLike, *, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """One image as ``(3, crop, crop)`` uint8: RGB, shorter side resized to ``resize``
    (bilinear, antialiased), centre-cropped to ``crop``."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    if crop > resize:
        raise ValueError(f"load_image: expected crop <= resize, got crop {crop} > resize {resize}")
    with Image.open(path) as img:
        img = img.convert("RGB")
        img = TF.resize(img, resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [crop, crop])
        return TF.pil_to_tensor(img)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` with the ImageNet statistics, for a uint8 ``(N, 3, H, W)`` batch."""
    return normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def image_batches(files: Sequence[Path], batch_size: int = 32, *, resize: int = 256,
                  crop: int = 224) -> Iterator[torch.Tensor]:
    """Normalised float batches ``(B, 3, crop, crop)`` of ``files`` in order (decoded lazily)."""
    for i in range(0, len(files), batch_size):
        yield imagenet_normalize(torch.stack([load_image(f, resize=resize, crop=crop)
                                              for f in files[i:i + batch_size]]))


def files_digest(files: Sequence[Path], **preprocessing) -> str:
    """sha256 of every file's absolute path, size and modification time, and ``preprocessing``."""
    h = hashlib.sha256(repr(sorted(preprocessing.items())).encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"\0{Path(f).resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()
