"""Suite-wide test settings.

Hypothesis: no deadline (a first call into torch can take a second), and ``print_blob`` so a
failure prints an ``@reproduce_failure`` line that replays the exact example anywhere, including
from a CI log on a fresh clone with no example database. Every test bounds its own
``max_examples`` to keep the suite inside the CI budget.
"""
import pytest
import torch
from hypothesis import settings

settings.register_profile("purenn", deadline=None, print_blob=True)
settings.load_profile("purenn")


@pytest.fixture
def cifar_folder(tmp_path, monkeypatch):
    """``make(train_per_class, test_per_class)`` writes a random PNG CIFAR-10 into
    ``tmp_path / "c10"`` (tests/random_cifar.py) and returns it; the decoded-data cache goes to
    ``tmp_path`` and ``$CIFAR10_DIR`` is unset, so nothing outside the test is read or written."""
    from random_cifar import write_random_cifar

    monkeypatch.setenv("PURENN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    return lambda train, test: write_random_cifar(tmp_path / "c10", train, test)


@pytest.fixture
def tiny_cifar(cifar_folder):
    """A 32x32 PNG image-folder CIFAR-10 with 6 train and 2 test images per class (modules that
    need other counts define their own ``tiny_cifar``)."""
    return cifar_folder(6, 2)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of many small-tensor tests: on a loaded 2-core CPU,
    OpenMP's spin-waits make such tests several times slower on two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
