"""wcord_jax: knowledge distillation (KD, CRD, WCoRD and baselines) in JAX/Flax."""

__version__ = "0.1.0"
