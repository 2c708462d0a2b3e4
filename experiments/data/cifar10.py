"""CIFAR-10 loading: find the data, decode it once into a uint8 cache, carve a validation split.

Two on-disk formats are read:

* the official python batches, ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
  (as torchvision downloads them): pickled dicts with ``b"data"`` ``(N, 3072)`` uint8 in CHW
  order and ``b"labels"``. They are unpickled by a restricted unpickler that only resolves the
  numpy names an array needs, and only from those known file names;
* an image-folder tree ``train/<class>/*.png|jpg`` and ``test/<class>/*`` (classes in the official
  CIFAR-10 order when the names are the CIFAR-10 names, else sorted; a name starting with ``.``,
  such as ``.ipynb_checkpoints``, is neither a class nor an image). Every image has one size: an
  odd one is named, measured against the size most images have.

Every split is decoded once into ``images (N, 3, H, W) uint8`` and ``labels (N,) int64`` and kept
in a safetensors cache file (``$PURENN_CACHE`` else ``$XDG_CACHE_HOME/purenn`` else
``~/.cache/purenn``), keyed by the data folder's absolute path and a hash of its file list, sizes
and modification times, and written atomically; writing it deletes the caches of the same
folder and split that an older file list left behind. The data folder itself is only read.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from layers._checks import check_positive_int
from nets.checkpoint import atomic_write

from ..common.progress import ProgressBar
from .dataset import Dataset

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Dataset",
    "DataNotFoundError",
    "cache_dir",
    "candidate_dirs",
    "find_data_dir",
    "load_cifar10",
    "load_cifar10_image",
    "validation_split",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation of the 50k official training images, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_BATCH_DIR = "cifar-10-batches-py"
_BATCH_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CACHE_VERSION = 1
_DECODE_CHUNK = 500   # files per decoding task (one process's share at a time)


class DataNotFoundError(FileNotFoundError):
    """No CIFAR-10 copy was found in any of the places looked at (the message names them all)."""


# --------------------------------------------------------------------------------------------
# Where the data is


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched, in order: ``data_dir`` if given, else ``$CIFAR10_DIR``, else ``./data``."""
    if data_dir is not None:
        return [Path(data_dir)]
    env = os.environ.get("CIFAR10_DIR")
    if env:
        return [Path(env)]
    return [Path("data")]


def _detect_format(root: Path) -> tuple[str, Path] | None:
    """``("batches", dir)`` or ``("folder", dir)`` if ``root`` holds CIFAR-10, else None."""
    if not root.is_dir():
        return None
    for batches in (root / _BATCH_DIR, root):
        if (batches / "data_batch_1").is_file() and (batches / "test_batch").is_file():
            return "batches", batches
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "folder", root
    return None


def _located(root: Path, split: str, where: str) -> tuple[str, Path]:
    """``(format, folder)`` of the CIFAR-10 copy in ``root`` (:func:`_detect_format`), for a
    valid ``split``; DataNotFoundError when ``root`` holds none."""
    if split not in ("train", "test"):
        raise ValueError(f"{where}: expected split 'train' or 'test', got {split!r}")
    found = _detect_format(root)
    if found is None:
        raise DataNotFoundError(f"{where}: expected CIFAR-10 (cifar-10-batches-py/ or "
                                f"train/ + test/ folders) in {root.resolve()}, found neither")
    return found


def find_data_dir(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The CIFAR-10 folder to read: the first of :func:`candidate_dirs` that holds either format.

    When none does and ``download`` is true, torchvision is asked to download the official
    python batches into the first candidate, provided that folder exists or is the default
    ``./data``: a folder named by ``--data-dir`` or ``$CIFAR10_DIR`` that does not exist is
    taken as a typing mistake and never created. A network (or permission) failure is caught
    and the search ends with one :class:`DataNotFoundError` that names every place looked at.
    """
    looked = []
    for root in candidate_dirs(data_dir):
        if _detect_format(root) is not None:
            return root
        looked.append(f"{root.resolve()} ("
                      + ("no such folder" if not root.exists() else
                         f"no {_BATCH_DIR}/ and no train/ or test/ folder") + ")")
    download_note = "download not attempted (offline mode)"
    target = candidate_dirs(data_dir)[0]
    named = data_dir is not None or bool(os.environ.get("CIFAR10_DIR"))
    if download and named and not target.is_dir():
        download_note = (f"download not attempted: {target} does not exist and is not created "
                         "(is the path mistyped? create the folder to download into it)")
    elif download:
        try:
            import torchvision

            print(f"CIFAR-10 not found; downloading it into {target.resolve()} ...", file=sys.stderr)
            torchvision.datasets.CIFAR10(str(target), train=True, download=True)
            torchvision.datasets.CIFAR10(str(target), train=False, download=True)
            if _detect_format(target) is not None:
                return target
            download_note = f"torchvision download into {target.resolve()} left no usable data"
        except Exception as err:  # network down, DNS failure, read-only folder, ...
            download_note = f"torchvision download into {target.resolve()} failed: {err}"
    raise DataNotFoundError(
        "find_data_dir: expected CIFAR-10 as cifar-10-batches-py/ or train/<class>/ + "
        "test/<class>/ image folders, found none. Looked in: " + "; ".join(looked)
        + f"; {download_note}. Pass --data-dir DIR or set CIFAR10_DIR.")


# --------------------------------------------------------------------------------------------
# Cache


def cache_dir() -> Path:
    """``$PURENN_CACHE``, else ``$XDG_CACHE_HOME/purenn``, else ``~/.cache/purenn``."""
    if os.environ.get("PURENN_CACHE"):
        return Path(os.environ["PURENN_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "purenn"
    return Path.home() / ".cache" / "purenn"


def _fingerprint(root: Path, files: Sequence[Path], extra: dict) -> str:
    """sha256 of the folder's absolute path, every file's relative name, size and mtime, and ``extra``."""
    h = hashlib.sha256()
    h.update(str(root.resolve()).encode())
    h.update(json.dumps(extra, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"\0{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Official python batches


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the numpy names a pickled ndarray needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core."):  # numpy >= 2 moved numpy.core to numpy._core
            module = "numpy._core." + module[len("numpy.core."):]
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                module = "numpy.core." + module[len("numpy._core."):]
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data (N, 3072) uint8, labels (N,) int64)`` of one official batch file, types checked."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as err:
        raise ValueError(f"load_cifar10: cannot read CIFAR batch {path}: {err}") from err
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"load_cifar10: expected a dict with b'data' and b'labels' in {path}, "
                         f"got {type(d).__name__} with keys {sorted(d) if isinstance(d, dict) else '-'}")
    data, labels = d[b"data"], d[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072):
        got = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
        raise ValueError(f"load_cifar10: expected b'data' as a (N, 3072) uint8 array in {path}, got {got}")
    if not (isinstance(labels, (list, np.ndarray))
            and all(isinstance(v, (int, np.integer)) for v in labels)):
        raise ValueError(f"load_cifar10: expected b'labels' as a list of ints in {path}, "
                         f"got {type(labels).__name__}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"load_cifar10: expected {data.shape[0]} labels in 0..9 in {path}, "
                         f"got shape {labels.shape}, range [{labels.min()}, {labels.max()}]")
    return data, labels


def _load_batches(batch_dir: Path, split: str, limit_per_class: int | None) -> Dataset:
    files = [batch_dir / name for name in _BATCH_FILES[split]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"load_cifar10: expected the official batch files, missing {missing}")
    datas, labels = zip(*(_read_batch(f) for f in files))
    data, label = np.concatenate(datas), np.concatenate(labels)
    if limit_per_class is not None:
        keep = np.concatenate([np.flatnonzero(label == c)[:limit_per_class] for c in range(10)])
        keep.sort()
        data, label = data[keep], label[keep]
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Dataset(images, torch.from_numpy(label), CIFAR10_CLASSES)


# --------------------------------------------------------------------------------------------
# Image folders


def _hidden(path: Path) -> bool:
    """A name starting with ``.`` (``.ipynb_checkpoints``, macOS's ``._0001.png``): not data."""
    return path.name.startswith(".")


def _folder_classes(root: Path) -> tuple[str, ...]:
    """Class names of an image-folder tree: official CIFAR-10 order if they match, else sorted.
    Hidden folders (a name starting with ``.``, such as Jupyter's ``.ipynb_checkpoints``) are not
    classes.

    Both splits, where both exist, must hold the same class folders: a class present in only
    one of them would shift every label after it, so it is an error that names it.
    """
    per_split = {split: {p.name for p in (root / split).iterdir() if p.is_dir() and not _hidden(p)}
                 for split in ("train", "test") if (root / split).is_dir()}
    names = set().union(*per_split.values())
    if len(per_split) == 2 and per_split["train"] != per_split["test"]:
        only = {s: sorted(per_split[s] - per_split[o]) for s, o in (("train", "test"), ("test", "train"))}
        where = "; ".join(f"only in {s}/: {', '.join(c)}" for s, c in only.items() if c)
        raise ValueError(f"load_cifar10: expected the same class folders in {root / 'train'} and "
                         f"{root / 'test'}, got {where}")
    if names == set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(sorted(names))


def _folder_files(root: Path, split: str, classes: Sequence[str],
                  limit_per_class: int | None) -> tuple[list[Path], list[int]]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"load_cifar10: expected the folder {split_dir} "
                                f"(an image-folder tree has train/<class>/ and test/<class>/)")
    files, labels = [], []
    for c, name in enumerate(classes):
        class_dir = split_dir / name
        found = sorted(p for p in class_dir.iterdir()
                       if p.suffix.lower() in _IMAGE_SUFFIXES and not _hidden(p))
        if not found:
            raise ValueError(f"load_cifar10: expected *.png or *.jpg images in every class folder, "
                             f"got none in {class_dir}")
        found = found[:limit_per_class] if limit_per_class is not None else found
        files += found
        labels += [c] * len(found)
    if not files:
        raise FileNotFoundError(f"load_cifar10: expected *.png or *.jpg images under "
                                f"{split_dir}/<class>/, found none")
    return files, labels


class _Decoded(NamedTuple):
    """One chunk of decoded files: ``images (n, H, W, 3) uint8`` when they all have one size (else
    None), each file's ``sizes`` ``(W, H)``, and ``error`` naming a file that did not decode."""

    images: np.ndarray | None
    sizes: list[tuple[int, int]]
    error: str | None = None


def _decode_chunk(paths: list[str]) -> _Decoded:
    """Decode ``paths``; a file that does not decode stops the chunk (its ``error`` names it)."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as err:
            return _Decoded(None, [], f"load_cifar10: cannot decode image {p}: {type(err).__name__}: {err}")
        out.append(arr)
    sizes = [(a.shape[1], a.shape[0]) for a in out]
    return _Decoded(np.stack(out) if len(set(sizes)) == 1 else None, sizes)


def _odd_size(files: Sequence[Path], sizes: Sequence[tuple[int, int]], desc: str) -> str:
    """The error naming the first file whose size is not the one most files have (so an odd
    image is the one named even when it sorts first)."""
    counts = collections.Counter(sizes)
    (w, h), n = counts.most_common(1)[0]
    k = next(i for i, size in enumerate(sizes) if size != (w, h))
    others = len(sizes) - n
    return (f"load_cifar10: expected every image {w}x{h} (as {n} of the {len(sizes)} in {desc}), "
            f"got {sizes[k][0]}x{sizes[k][1]} in {files[k]}"
            + (f" (and {others - 1} more of another size)" if others > 1 else ""))


def _decode_files(files: list[Path], workers: int, progress: bool, desc: str) -> torch.Tensor:
    chunk = _DECODE_CHUNK
    chunks = [[str(f) for f in files[i:i + chunk]] for i in range(0, len(files), chunk)]
    arrays, sizes, done = [], [], 0
    bar = ProgressBar(len(files), f"decoding {desc}", enabled=None if progress else False)

    def consume(results):
        nonlocal done
        for decoded in results:
            if decoded.error is not None:
                raise ValueError(decoded.error)
            arrays.append(decoded.images)
            sizes.extend(decoded.sizes)
            done += len(decoded.sizes)
            bar.update(done, done)

    if workers <= 1 or len(chunks) == 1:
        consume(map(_decode_chunk, chunks))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            consume(pool.map(_decode_chunk, chunks))
    if progress:
        bar.close(f"decoded {desc}: {done} images")
    if len(set(sizes)) != 1:
        raise ValueError(_odd_size(files, sizes, desc))
    return torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Public loader


def load_cifar10(root: str | os.PathLike, split: str = "train", *, limit_per_class: int | None = None,
                 cache: bool = True, workers: int | None = None, progress: bool = True) -> Dataset:
    """Decode one split of a CIFAR-10 folder (either format) once, then read it from the cache.

    Args:
      root: a folder holding ``cifar-10-batches-py/`` (or being it), or ``train/`` and ``test/``.
      split: ``"train"`` or ``"test"``.
      limit_per_class: keep only the first ``k`` images of each class (only those are decoded).
      cache: read/write the uint8 cache in :func:`cache_dir`.
      workers: decoding processes for image folders (default ``min(4, cpu_count)``).
      progress: print decoding progress on stderr.

    Returns:
      :class:`Dataset` with ``images (N, 3, H, W) uint8`` and ``labels (N,) int64``.
    """
    if limit_per_class is not None:
        check_positive_int(limit_per_class, "load_cifar10", "limit_per_class (or None)")
    root = Path(root)
    fmt, where = _located(root, split, "load_cifar10")
    if fmt == "batches":
        files = [where / n for n in _BATCH_FILES[split]]
        classes = CIFAR10_CLASSES
        files_for_hash = [f for f in files if f.is_file()]
    else:
        classes = _folder_classes(where)
        files, file_labels = _folder_files(where, split, classes, limit_per_class)
        files_for_hash = files
    key = _fingerprint(where, files_for_hash, {"split": split, "limit": limit_per_class,
                                               "format": fmt, "version": _CACHE_VERSION})
    cache_path = cache_dir() / f"cifar10-{split}-{key[:20]}.safetensors"
    if cache and cache_path.is_file():
        try:
            t = load_file(str(cache_path))
            return Dataset(t["images"], t["labels"], classes)
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            print(f"load_cifar10: ignoring unreadable cache {cache_path}: {err}", file=sys.stderr)
    if fmt == "batches":
        data = _load_batches(where, split, limit_per_class)
    else:
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        images = _decode_files(files, workers, progress, f"{where}/{split}")
        data = Dataset(images, torch.tensor(file_labels, dtype=torch.int64), classes)
    if cache:
        resolved = str(where.resolve())
        source = json.dumps({"root": resolved, "split": split, "limit": limit_per_class, "format": fmt},
                            sort_keys=True)
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_path, save({"images": data.images.contiguous(),
                                           "labels": data.labels.contiguous()},
                                          metadata={"root": resolved, "split": split,
                                                    "source": source,
                                                    "classes": json.dumps(classes)}))
        except OSError as err:  # an unwritable cache only costs speed
            print(f"load_cifar10: could not write cache {cache_path}: {err}", file=sys.stderr)
        else:
            _remove_superseded(cache_path, source)
    return data


def _remove_superseded(kept: Path, source: str) -> None:
    """Delete the other cache files of the same folder, split and subset as ``kept``.

    They were keyed by an older file list (files changed, or the folder was copied in again
    with new modification times) and can never be read again; left alone, every re-created data
    folder would leave ~150 MB behind. Files written without a ``source`` entry are kept.
    """
    for other in kept.parent.glob("cifar10-*.safetensors"):
        if other == kept:
            continue
        try:
            with safe_open(str(other), framework="pt") as f:
                if (f.metadata() or {}).get("source") != source:
                    continue
            other.unlink()
        except Exception:  # unreadable, or removed by another process: not ours to judge
            continue


# --------------------------------------------------------------------------------------------
# Validation split


def validation_split(labels: torch.Tensor, val: float | int, key: torch.Tensor,
                     num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified ``(train_index, val_index)`` of ``labels (N,)``, drawn from ``key``.

    ``val`` is a fraction in ``[0, 1)`` or a count in ``[0, N)``. Each class ``c`` with ``n_c``
    images gives ``round(val * n_c)`` images (a count is spread over the classes in proportion
    to their sizes, largest remainder first), chosen by ``permutation(fold_in(key, c), n_c)``.
    Both index tensors are sorted int64.
    """
    from layers import random as jr

    labels = torch.as_tensor(labels)
    n = labels.numel()
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"validation_split: expected val a float fraction or an int count, got {type(val).__name__}")
    if isinstance(val, float) and not (0.0 <= val < 1.0):
        raise ValueError(f"validation_split: expected a fraction in [0, 1), got {val}")
    if isinstance(val, int) and not (0 <= val < n):
        raise ValueError(f"validation_split: expected a count in [0, {n}), got {val}")
    num_classes = int(labels.max()) + 1 if num_classes is None and n else (num_classes or 0)
    sizes = torch.bincount(labels, minlength=num_classes).tolist()
    frac = val if isinstance(val, float) else val / n
    exact = [frac * s for s in sizes]
    take = [int(round(e)) for e in exact]
    if isinstance(val, int):
        take = [int(e) for e in exact]
        order = sorted(range(num_classes), key=lambda c: exact[c] - take[c], reverse=True)
        for c in order[: val - sum(take)]:
            take[c] += 1
    train_parts, val_parts = [], []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        perm = jr.permutation(jr.fold_in(key, c), idx.numel()).to(idx.device)
        val_parts.append(idx[perm[: take[c]]])
        train_parts.append(idx[perm[take[c]:]])
    return (torch.cat(train_parts).sort().values if train_parts else torch.zeros(0, dtype=torch.int64),
            torch.cat(val_parts).sort().values if val_parts else torch.zeros(0, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# One image


def load_cifar10_image(root: str | os.PathLike, index: int, split: str = "test") -> torch.Tensor:
    """Image ``index`` of one split, ``(3, H, W) uint8``: ``load_cifar10(root, split).images[index]``
    without decoding the other images, and without reading or writing the cache.

    An image-folder tree decodes only that file (the ``index``-th in :func:`load_cifar10`'s order:
    classes in their order, each class's files sorted). Python batches unpickle the batch files
    up to the one holding row ``index`` (all of them for a negative ``index``, which counts from
    the end as for a tensor) and reshape that row only.
    """
    fmt, where = _located(Path(root), split, "load_cifar10_image")
    if fmt == "folder":
        files, _ = _folder_files(where, split, _folder_classes(where), None)
        parts = [files]
    else:
        files = [where / n for n in _BATCH_FILES[split]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"load_cifar10_image: expected the official batch files, "
                                    f"missing {missing}")
        parts = []
        for f in files:
            parts.append(_read_batch(f)[0])
            if 0 <= index < sum(map(len, parts)):
                break
    count = sum(map(len, parts))  # the whole split's, unless the row was found early
    k = index + count if index < 0 else index
    if not 0 <= k < count:
        raise IndexError(f"load_cifar10_image: expected an index in [-{count}, {count}) of the "
                         f"{count} {split} images in {where}, got {index}")
    for part in parts:
        if k < len(part):
            break
        k -= len(part)
    if fmt == "batches":
        return torch.from_numpy(part[k].reshape(3, 32, 32).copy())
    decoded = _decode_chunk([str(part[k])])
    if decoded.error is not None:
        raise ValueError(decoded.error)
    return torch.from_numpy(decoded.images[0]).permute(2, 0, 1).contiguous()
