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


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of many small-tensor tests: on a loaded 2-core CPU,
    OpenMP's spin-waits make such tests several times slower on two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
