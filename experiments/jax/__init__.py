"""Nets as JAX functions at work: Model B trained with optax inside ``jax.jit`` through
:func:`nets.jax_apply` (:mod:`experiments.jax.train`), the command ``python -m
experiments.jax_train``. See docs/jax.md."""
from .train import JaxTrainConfig, check_record_path, machine, run

__all__ = ["JaxTrainConfig", "check_record_path", "machine", "run"]
