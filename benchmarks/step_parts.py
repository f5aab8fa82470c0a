"""Where a CRD step's time goes: its parts timed one by one, each as its own jit-compiled function (CPU or GPU).

    python benchmarks/step_parts.py --teacher resnet32x4 --student resnet8x4 [--steps 10] [--dtype float32]

The parts of `distill.distill_step` for CRD (batch 64, N = 50,000, K = 16,384, 100 classes, 32x32x3), each compiled
alone so that XLA cannot fuse across them:

* `teacher_forward`: the teacher's forward pass in eval mode;
* `student_fwd_bwd_sgd`: the student's forward pass in train mode, cross-entropy, its backward pass and the SGD
  (momentum, weight decay) update;
* `negatives_sampling`: drawing K other-class indices per anchor without replacement (`losses.sample_contrast_idx`);
* `crd_loss_fwd_bwd`: the two embedding heads, the CRD loss with its memories (scores, NCE, memory update) and its
  gradient with respect to the heads' inputs.

`benchmarks/repdistiller_step.py --parts` times the same parts of RepDistiller's PyTorch step. The sum of the parts
against the whole step (`python -m wcord_jax.tools.bench`) shows what the one compiled step saves or loses. Prints one JSON
line; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import flax.linen as nn  # noqa: E402

from wcord_jax import losses, models  # noqa: E402


class Embed(nn.Module):
    dim: int = 128

    @nn.compact
    def __call__(self, x):
        z = nn.Dense(self.dim)(x.reshape(x.shape[0], -1).astype(jnp.float32))
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def _time(fn, args, steps, rounds):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / steps)
    return round(1000 * statistics.median(times), 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_train", type=int, default=50000)
    p.add_argument("--num_classes", type=int, default=100)
    p.add_argument("--nce_k", type=int, default=16384)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    B, N, C, K = args.batch_size, args.num_train, args.num_classes, args.nce_k
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (B, 32, 32, 3))
    y = jax.random.randint(key, (B,), 0, C)
    idx = jax.random.randint(jax.random.PRNGKey(1), (B,), 0, N)
    all_labels = np.repeat(np.arange(C), N // C)

    teacher = models.get_model(args.teacher, C, dtype=dtype)
    student = models.get_model(args.student, C, dtype=dtype)
    t_vars = teacher.init(key, x[:2], train=False)
    s_vars = student.init(key, x[:2], train=False)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    opt_state = tx.init(s_vars["params"])

    @jax.jit
    def teacher_forward(t_vars, x):
        logits, feats = teacher.apply(t_vars, x, train=False)
        return logits, feats[-1]

    @jax.jit
    def student_step(s_vars, opt_state, x, y):
        def loss_fn(params):
            (logits, feats), new = student.apply({**s_vars, "params": params}, x, train=True,
                                                 mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(s_vars["params"])
        updates, opt_state = tx.update(grads, opt_state, s_vars["params"])
        return {**s_vars, **new, "params": optax.apply_updates(s_vars["params"], updates)}, opt_state, loss

    class_index = losses.build_class_index(all_labels, C)

    @jax.jit
    def sample(key, idx, labels):
        return losses.sample_contrast_idx(key, idx, labels, class_index, K)

    _, f_t = teacher_forward(t_vars, x)
    _, s_feats = student.apply(s_vars, x, train=False)
    f_s = s_feats[-1]
    embed_s, embed_t = Embed(), Embed()
    h_s, h_t = embed_s.init(key, f_s), embed_t.init(key, f_t)
    state = losses.init_crd_state(key, N, 128)
    labels = jnp.asarray(all_labels)[idx]
    contrast_idx = sample(key, idx, labels)

    @jax.jit
    def crd_step(h_s, h_t, state, f_s, f_t):
        def loss_fn(h_s, h_t, f_s):
            loss, new_state = losses.crd_loss(state, embed_s.apply(h_s, f_s), embed_t.apply(h_t, f_t), idx,
                                              contrast_idx)
            return loss, new_state
        (loss, new_state), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(h_s, h_t, f_s)
        return loss, new_state, grads

    parts = {}
    print("timing teacher_forward ...", file=sys.stderr)
    parts["teacher_forward"] = _time(teacher_forward, (t_vars, x), args.steps, args.rounds)
    print("timing student_fwd_bwd_sgd ...", file=sys.stderr)
    parts["student_fwd_bwd_sgd"] = _time(student_step, (s_vars, opt_state, x, y), args.steps, args.rounds)
    print("timing negatives_sampling ...", file=sys.stderr)
    parts["negatives_sampling"] = _time(sample, (key, idx, labels), args.steps, args.rounds)
    print("timing crd_loss_fwd_bwd ...", file=sys.stderr)
    parts["crd_loss_fwd_bwd"] = _time(crd_step, (h_s, h_t, state, f_s, f_t), args.steps, args.rounds)
    print(json.dumps({"framework": "wcord_jax (jax)", "teacher": args.teacher, "student": args.student,
                      "batch_size": B, "nce_k": K, "num_train": N, "dtype": args.dtype, "ms": parts,
                      "sum_ms": round(sum(parts.values()), 1), "backend": jax.default_backend(),
                      "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                      "xla_flags": os.environ.get("XLA_FLAGS", "")}))


if __name__ == "__main__":
    main()
