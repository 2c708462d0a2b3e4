"""Shared by the JAX test modules (test_nets_jax, test_jax_layers, test_jax_optim, test_jax_apply)."""
import contextlib

import pytest


@contextlib.contextmanager
def x64(jax, enabled=True):
    """jax with float64 / int64 switched on (or off) inside the block, restored afterwards."""
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


@pytest.fixture(scope="module")
def jax_x64(one_thread):
    """jax with x64 on for a whole module (keys are int64; the checks run in float64), torch on
    one thread. Import it into a module and name it in ``pytestmark``."""
    import jax
    with x64(jax):
        yield jax
