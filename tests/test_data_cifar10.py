"""CIFAR-10 loading: both formats on tiny generated data sets, the cache, errors, the split."""
import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from experiments.data import cifar10 as D
from layers import random as jr


def _images(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def write_folder(root, per_class, classes=D.CIFAR10_CLASSES, fmt="png", seed=0):
    """An image-folder tree; returns {split: (images (N,3,32,32) uint8, labels)} in load order."""
    out = {}
    for s, split in enumerate(("train", "test")):
        imgs, labels = [], []
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            x = _images(seed * 1000 + s * 100 + c, per_class)
            for i in range(per_class):
                Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(root / split / name / f"{i:04d}.{fmt}")
            imgs.append(x)
            labels += [c] * per_class
        out[split] = (torch.cat(imgs), torch.tensor(labels))
    return out


def write_batches(root, per_batch=20, seed=0):
    """A fake cifar-10-batches-py/ (5 train batches + test batch) written with pickle."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        out["test" if name == "test_batch" else "train"].append((data, labels))
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in D.CIFAR10_CLASSES]}, f)
    return {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for k, v in out.items()}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PURENN_CACHE", str(tmp_path / "cache"))


def test_png_folder_loads_exact_pixels_labels_in_official_class_order(tmp_path):
    truth = write_folder(tmp_path / "c10", 3)
    for split in ("train", "test"):
        ds = D.load_cifar10(tmp_path / "c10", split, workers=1, progress=False)
        assert ds.classes == D.CIFAR10_CLASSES
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (30, 3, 32, 32)
        assert torch.equal(ds.images, truth[split][0])  # PNG is lossless
        assert torch.equal(ds.labels, truth[split][1])


def test_jpeg_folder_with_other_class_names_uses_sorted_order_and_decodes_close(tmp_path):
    classes = ("zebra", "ant", "moth")
    truth = write_folder(tmp_path / "f", 2, classes=classes, fmt="jpg")
    ds = D.load_cifar10(tmp_path / "f", "train", workers=2, progress=False)
    assert ds.classes == ("ant", "moth", "zebra")
    # labels follow sorted names: ant (written 2nd) -> 0, moth -> 1, zebra -> 2
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    order = [2, 3, 4, 5, 0, 1]
    # JPEG is lossy on random noise; the decoded image must still correlate with what was written.
    a, b = ds.images.double().flatten(1), truth["train"][0][order].double().flatten(1)
    corr = ((a - a.mean(1, keepdim=True)) * (b - b.mean(1, keepdim=True))).sum(1) / (
        a.std(1) * b.std(1) * (a.shape[1] - 1))
    assert (corr > 0.5).all()


def test_python_batches_load_exact_arrays(tmp_path):
    truth = write_batches(tmp_path / "root")
    for split in ("train", "test"):
        ds = D.load_cifar10(tmp_path / "root", split, progress=False)
        assert torch.equal(ds.images, torch.from_numpy(truth[split][0]).reshape(-1, 3, 32, 32))
        assert torch.equal(ds.labels, torch.from_numpy(truth[split][1]).long())
    # the batches folder itself is accepted as root too
    ds = D.load_cifar10(tmp_path / "root" / "cifar-10-batches-py", "test", progress=False)
    assert len(ds.labels) == 20


def test_python_batches_limit_per_class_keeps_first_k_of_each_class(tmp_path):
    truth = write_batches(tmp_path / "root", per_batch=40)
    ds = D.load_cifar10(tmp_path / "root", "train", limit_per_class=2, progress=False)
    labels = truth["train"][1]
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(10)]))
    assert torch.equal(ds.labels, torch.from_numpy(labels[keep]).long())
    assert torch.equal(ds.images, torch.from_numpy(truth["train"][0][keep]).reshape(-1, 3, 32, 32))


def test_python_batch_with_foreign_global_is_refused(tmp_path):
    write_batches(tmp_path / "root")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "root" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="test_batch.*not allowed"):
        D.load_cifar10(tmp_path / "root", "test", progress=False)


def test_python_batch_with_wrong_types_is_refused(tmp_path):
    write_batches(tmp_path / "root")
    with open(tmp_path / "root" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\(N, 3072\) uint8.*test_batch|test_batch.*float32"):
        D.load_cifar10(tmp_path / "root", "test", progress=False)


def test_limit_per_class_decodes_only_those_files(tmp_path):
    write_folder(tmp_path / "c10", 3)
    # a corrupt file that sorts last in its class is never opened under limit_per_class=2
    (tmp_path / "c10" / "train" / "cat" / "9999.png").write_bytes(b"not a png")
    ds = D.load_cifar10(tmp_path / "c10", "train", limit_per_class=2, workers=1, progress=False)
    assert ds.labels.bincount().tolist() == [2] * 10


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_image_stops_loading_naming_the_file(tmp_path, workers):
    write_folder(tmp_path / "c10", 2)
    bad = tmp_path / "c10" / "test" / "dog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    with pytest.raises(ValueError, match=r"cannot decode image .*dog/0001\.png"):
        D.load_cifar10(tmp_path / "c10", "test", workers=workers, progress=False)


def test_cache_is_written_then_used_and_invalidated_by_a_changed_file(tmp_path):
    write_folder(tmp_path / "c10", 2)
    first = D.load_cifar10(tmp_path / "c10", "train", workers=1, progress=False)
    files = list((tmp_path / "cache").glob("cifar10-train-*.safetensors"))
    assert len(files) == 1
    # Make the source unreadable-as-image but keep size/mtime: the cache must be what is read.
    victim = tmp_path / "c10" / "train" / "cat" / "0000.png"
    st_ = victim.stat()
    victim.write_bytes(b"\0" * st_.st_size)
    os.utime(victim, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    again = D.load_cifar10(tmp_path / "c10", "train", workers=1, progress=False)
    assert torch.equal(first.images, again.images)
    # A new mtime changes the key: the folder is decoded again (and the zeroed file now fails).
    os.utime(victim, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="cat/0000.png"):
        D.load_cifar10(tmp_path / "c10", "train", workers=1, progress=False)


def test_a_rebuilt_cache_replaces_the_stale_one_of_the_same_folder_and_split_only(tmp_path):
    write_folder(tmp_path / "c10", 2)
    write_folder(tmp_path / "other", 1)
    D.load_cifar10(tmp_path / "c10", "train", workers=1, progress=False)
    (stale,) = (tmp_path / "cache").glob("*.safetensors")
    D.load_cifar10(tmp_path / "c10", "test", workers=1, progress=False)
    D.load_cifar10(tmp_path / "c10", "train", limit_per_class=1, workers=1, progress=False)
    D.load_cifar10(tmp_path / "other", "train", workers=1, progress=False)
    foreign = tmp_path / "cache" / "cifar10-train-written-by-someone-else.safetensors"
    foreign.write_bytes(b"not a safetensors file")
    before = set((tmp_path / "cache").glob("*.safetensors"))
    assert len(before) == 5
    # The folder is copied in again: same files, new modification times -> a new key.
    for f in (tmp_path / "c10" / "train").rglob("*.png"):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    D.load_cifar10(tmp_path / "c10", "train", workers=1, progress=False)
    after = set((tmp_path / "cache").glob("*.safetensors"))
    added, removed = after - before, before - after
    assert len(added) == 1 and len(removed) == 1
    # Only the full train cache of c10 went: its test split, its 1-per-class subset, the other
    # folder and a file that is not ours stay.
    assert removed == {stale} and foreign in after
    assert len(after) == 5


def test_loading_never_writes_into_the_data_folder_and_works_read_only(tmp_path):
    write_folder(tmp_path / "c10", 1)
    before = sorted(p for p in (tmp_path / "c10").rglob("*"))
    for dirpath, dirs, files in os.walk(tmp_path / "c10"):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o444)
        os.chmod(dirpath, 0o555)
    try:
        ds = D.load_cifar10(tmp_path / "c10", "test", workers=1, progress=False)
        assert len(ds.labels) == 10
        assert sorted(p for p in (tmp_path / "c10").rglob("*")) == before
        assert list((tmp_path / "cache").glob("cifar10-test-*.safetensors"))
    finally:
        for dirpath, dirs, files in os.walk(tmp_path / "c10"):
            os.chmod(dirpath, 0o755)


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("PURENN_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert D.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("PURENN_CACHE")
    assert D.cache_dir() == tmp_path / "x" / "purenn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(D.cache_dir()).endswith(os.path.join(".cache", "purenn"))


def test_find_data_dir_order_and_error_names_every_place(tmp_path, monkeypatch):
    write_folder(tmp_path / "env", 1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "env"))
    assert D.find_data_dir(None, download=False) == tmp_path / "env"
    with pytest.raises(D.DataNotFoundError, match="nowhere"):
        D.find_data_dir(tmp_path / "nowhere", download=False)
    monkeypatch.delenv("CIFAR10_DIR")
    with pytest.raises(D.DataNotFoundError) as err:
        D.find_data_dir(None, download=False)
    assert str(tmp_path / "data") in str(err.value) and "--data-dir" in str(err.value)


def test_find_data_dir_reports_a_failed_download(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    (tmp_path / "empty").mkdir()   # an existing folder: the download is tried there
    with pytest.raises(D.DataNotFoundError, match="download .*failed: network is unreachable"):
        D.find_data_dir(tmp_path / "empty", download=True)


def test_find_data_dir_never_creates_a_named_folder_that_does_not_exist(tmp_path, monkeypatch):
    import torchvision

    def must_not_run(*a, **k):
        raise AssertionError("no download into a folder that does not exist")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", must_not_run)
    for named in ("arg", "env"):
        typo = tmp_path / f"cifar-typo-{named}"
        if named == "env":
            monkeypatch.setenv("CIFAR10_DIR", str(typo))
        with pytest.raises(D.DataNotFoundError, match="does not exist and is not created"):
            D.find_data_dir(typo if named == "arg" else None, download=True)
        assert not typo.exists()


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), per_class=st.lists(st.integers(1, 30), min_size=2, max_size=6),
       frac=st.floats(0.0, 0.9))
def test_validation_split_is_a_stratified_partition(seed, per_class, frac):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    key = jr.key(seed)
    tr, va = D.validation_split(labels, frac, key)
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(len(labels)))
    for c, n in enumerate(per_class):
        assert int((labels[va] == c).sum()) == round(frac * n)
    tr2, va2 = D.validation_split(labels, frac, key)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), per_class=st.lists(st.integers(1, 30), min_size=2, max_size=6),
       data=st.data())
def test_validation_split_count_is_exact_and_proportional(seed, per_class, data):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    count = data.draw(st.integers(0, len(labels) - 1))
    tr, va = D.validation_split(labels, count, jr.key(seed))
    assert len(va) == count and len(tr) == len(labels) - count
    for c, n in enumerate(per_class):
        # each class gets floor or ceil of its proportional share
        share = count * n / len(labels)
        assert int(share) <= int((labels[va] == c).sum()) <= int(share) + 1


def test_validation_split_rejects_bad_sizes():
    labels = torch.arange(10) % 2
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\), got 1.5"):
        D.validation_split(labels, 1.5, jr.key(0))
    with pytest.raises(ValueError, match="count in \\[0, 10\\), got 10"):
        D.validation_split(labels, 10, jr.key(0))
    with pytest.raises(TypeError, match="got str"):
        D.validation_split(labels, "0.1", jr.key(0))


def test_different_keys_give_different_validation_sets():
    labels = torch.arange(1000) % 10
    _, a = D.validation_split(labels, 0.2, jr.key(1))
    _, b = D.validation_split(labels, 0.2, jr.key(2))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("odd", ["0000.png", "0001.png"])
def test_an_odd_sized_image_is_the_one_named_even_when_it_sorts_first(tmp_path, odd):
    write_folder(tmp_path / "c10", 3)
    bad = tmp_path / "c10" / "train" / "airplane" / odd        # the first file of the split, or not
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(bad)
    with pytest.raises(ValueError, match=rf"expected every image 32x32 \(as 29 of the 30 in .*\), "
                                         rf"got 40x30 in .*airplane/{odd}$"):
        D.load_cifar10(tmp_path / "c10", "train", workers=1, progress=False, cache=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_odd_sized_image_is_named_across_decoding_chunks(tmp_path, monkeypatch, workers):
    write_folder(tmp_path / "c10", 2)
    monkeypatch.setattr(D, "_DECODE_CHUNK", 3)                  # 7 chunks of the 20 test files
    bad = tmp_path / "c10" / "test" / "airplane" / "0000.png"  # first; 2 of its chunk of 3 are 8x8
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "c10" / "test" / "automobile" / "0000.png")
    with pytest.raises(ValueError, match=r"expected every image 32x32 \(as 18 of the 20 in .*\), got 8x8 "
                                         r"in .*airplane/0000\.png \(and 1 more of another size\)$"):
        D.load_cifar10(tmp_path / "c10", "test", workers=workers, progress=False, cache=False)


def test_hidden_folders_are_not_classes_and_hidden_files_not_images(tmp_path):
    truth = write_folder(tmp_path / "c10", 2)
    for split in ("train", "test"):                         # Jupyter's checkpoints, in one split only
        (tmp_path / "c10" / split / ".ipynb_checkpoints").mkdir()
    (tmp_path / "c10" / "train" / ".cache").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "c10" / "train" / "cat" / "._0000.png")
    (tmp_path / "c10" / "train" / "dog" / ".ipynb_checkpoints").mkdir()
    ds = D.load_cifar10(tmp_path / "c10", "train", workers=1, progress=False, cache=False)
    assert ds.classes == D.CIFAR10_CLASSES
    assert torch.equal(ds.images, truth["train"][0]) and torch.equal(ds.labels, truth["train"][1])
