"""The matmul precision of the products that are scaled up before an `exp`: CRD's scores, WCoRD's critic (its NCE
logits and gradient penalty) and the cosine costs of the Sinkhorn plan.

`SCORES = HIGHEST`: float32 products on every backend. Left to the backend, an f32 dot runs as one bfloat16 pass on
a TPU (and may use TF32 on an Ampere-or-later GPU), about 3 significant digits. CRD's and WCoRD's scores are divided
by tau = 0.07 (x14.3) before `exp`, so an error of 2^-8 in a cosine near 1 shifts `exp` by about 5%, and the
Sinkhorn kernel exp(-C / epsilon) at epsilon = 0.05 multiplies cost errors by 20. These products are small next to
the networks' convolutions ([B, D] x [D, K] with D = 128), so full precision costs little. On the CPU it changes
nothing (XLA:CPU computes f32 products in f32): the CPU figures stay as they were.
"""
import jax

SCORES = jax.lax.Precision.HIGHEST
SCORES_NAME = "highest"  # the same, as jax.default_matmul_precision names it (for code this library does not own)


def scores_context():
    """A context in which every product traced takes `SCORES` (for ott-jax's cost matrices)."""
    return jax.default_matmul_precision(SCORES_NAME)
