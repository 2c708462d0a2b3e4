"""Test inputs in every memory layout a layer must accept: the public ones of ``layers.testing``
(kept under this name for the tests that import it)."""
from layers.testing import LAYOUTS, make_input, with_layout  # noqa: F401
