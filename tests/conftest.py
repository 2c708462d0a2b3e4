"""Suite-wide test settings.

Hypothesis: no deadline (a first call into torch can take a second), and ``print_blob`` so a
failure prints an ``@reproduce_failure`` line that replays the exact example anywhere, including
from a CI log on a fresh clone with no example database. Every test bounds its own
``max_examples`` to keep the suite inside the CI budget.
"""
from hypothesis import settings

settings.register_profile("purenn", deadline=None, print_blob=True)
settings.load_profile("purenn")
