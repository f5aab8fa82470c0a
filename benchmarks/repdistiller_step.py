"""Time RepDistiller's CRD training step (PyTorch, CPU) from a checkout of RepDistiller.

The figure that `python -m wcord_jax.tools.bench` is compared with in BENCHMARKS.md ("CPU: wcord_jax against
RepDistiller"). Not run in CI: it needs PyTorch (`pip install torch==2.13.0`, the CPU build) and a checkout of
https://github.com/HobbitLong/RepDistiller.

    python benchmarks/repdistiller_step.py --repdistiller PATH/TO/RepDistiller \
        --teacher resnet32x4 --student resnet8x4 --steps 20

What one step is, as in RepDistiller's `helper/loops.py::train_distill` with `--distill crd -r 1 -a 0 -b 0.8`:
the student's forward pass (train mode) with features, the teacher's forward pass (eval mode, no gradient),
cross-entropy, the KL term (computed and weighted 0, as RepDistiller does), `CRDLoss` (its two embeddings, the
contrast memories of N x 128, K = 16384 negatives per anchor, the memory update), the backward pass and SGD with
momentum 0.9 and weight decay 5e-4 over the student and the two embeddings. The batch (images as a float tensor,
labels, indices and the [B, K+1] contrast indices) is made before the clock starts, as RepDistiller's data loader
workers make it in parallel with the step; the loader's own work per batch (RepDistiller's per-example
`np.random.choice(cls_negative[target], K, replace=False)` plus the crop/flip/normalise transforms) is timed
separately in one thread and printed as `loader_ms_per_batch`, not added to the step.

Weights are random (the teacher's values do not change the step's cost). RepDistiller's `ContrastMemory` moves
its unused alias sampler to CUDA in `__init__`; the script turns that call into a no-op so it runs on the CPU
(CIFAR-100 CRD always passes contrast indices, so the sampler is never used). Prints one JSON line.

`--parts` adds the times of the step's parts, each run alone (`parts_ms`): the teacher's forward pass, the student's
forward, cross-entropy, backward and SGD update, the loader's negative sampling for one batch, and `CRDLoss` forward
and backward (embeddings, memories, memory update); the same parts as `benchmarks/step_parts.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repdistiller", required=True, help="path of a RepDistiller checkout")
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_classes", type=int, default=100)
    p.add_argument("--num_train", type=int, default=50000)
    p.add_argument("--nce_k", type=int, default=16384)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1, help="repeat the timing; medians are reported")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", action="store_true",
                   help="also time the step's parts one by one (as benchmarks/step_parts.py does for wcord_jax)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    root = os.path.abspath(args.repdistiller)
    if not os.path.isfile(os.path.join(root, "crd", "memory.py")):
        sys.exit(f"error: --repdistiller {args.repdistiller!r} is not a RepDistiller checkout (no crd/memory.py)")
    sys.path.insert(0, root)
    import torch
    from torch import nn, optim

    import crd.memory
    crd.memory.AliasMethod.cuda = lambda self: None  # unused on CIFAR (contrast indices are given); CUDA-only
    from crd.criterion import CRDLoss
    from distiller_zoo import DistillKL
    from models import model_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    B, K, N, C = args.batch_size, args.nce_k, args.num_train, args.num_classes

    model_t = model_dict[args.teacher](num_classes=C)
    model_s = model_dict[args.student](num_classes=C)
    probe = torch.randn(2, 3, 32, 32)
    model_t.eval(), model_s.eval()
    feat_t, _ = model_t(probe, is_feat=True)
    feat_s, _ = model_s(probe, is_feat=True)
    opt = argparse.Namespace(s_dim=feat_s[-1].shape[1], t_dim=feat_t[-1].shape[1], feat_dim=128, n_data=N,
                             nce_k=K, nce_t=0.07, nce_m=0.5)
    criterion_cls, criterion_div, criterion_kd = nn.CrossEntropyLoss(), DistillKL(4.0), CRDLoss(opt)
    trainable = nn.ModuleList([model_s, criterion_kd.embed_s, criterion_kd.embed_t])
    optimizer = optim.SGD(trainable.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gamma, alpha, beta = 1.0, 0.0, 0.8

    # CIFAR-100's label layout: N / C examples per class; RepDistiller's per-class negative pools.
    labels = np.repeat(np.arange(C), N // C)
    cls_negative = [np.flatnonzero(labels != c) for c in range(C)]
    images_u8 = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    mean = np.array([0.5071, 0.4867, 0.4408], np.float32)
    std = np.array([0.2675, 0.2565, 0.2761], np.float32)

    def loader_batch():
        """One batch as RepDistiller's CIFAR100InstanceSample + transforms make it (one thread)."""
        idx = rng.integers(0, N, B)
        xs, cidx = [], []
        for i in idx:
            img = np.pad(images_u8[i], ((4, 4), (4, 4), (0, 0)))
            dy, dx = rng.integers(0, 9, 2)
            img = img[dy:dy + 32, dx:dx + 32]
            if rng.random() < 0.5:
                img = img[:, ::-1]
            xs.append(((img.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
            neg = np.random.choice(cls_negative[labels[i]], K, replace=False)
            cidx.append(np.hstack([[i], neg]))
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(labels[idx]), torch.from_numpy(idx),
                torch.from_numpy(np.stack(cidx)))

    def step(batch):
        x, y, index, contrast_idx = batch
        model_s.train(), criterion_kd.embed_s.train(), criterion_kd.embed_t.train()
        model_t.eval()
        feat_s, logit_s = model_s(x, is_feat=True)
        with torch.no_grad():
            feat_t, logit_t = model_t(x, is_feat=True)
            feat_t = [f.detach() for f in feat_t]
        loss = (gamma * criterion_cls(logit_s, y) + alpha * criterion_div(logit_s, logit_t)
                + beta * criterion_kd(feat_s[-1], feat_t[-1], index, contrast_idx))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.item())

    print(f"building {args.warmup + args.steps} batches ...", file=sys.stderr)
    t0 = time.perf_counter()
    batches = [loader_batch() for _ in range(args.warmup + args.steps)]
    loader_ms = 1000 * (time.perf_counter() - t0) / len(batches)
    loss = None
    for b in batches[:args.warmup]:
        loss = step(b)
    times, cpu_times = [], []
    for r in range(args.rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        for b in batches[args.warmup:]:
            loss = step(b)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        times.append(wall / args.steps)
        cpu_times.append(cpu / args.steps)
        print(f"round {r + 1}/{args.rounds}: {B / times[-1]:.1f} img/s", file=sys.stderr)
    ms = 1000 * statistics.median(times)
    parts = time_parts(args, batches[0], model_t, model_s, criterion_cls, criterion_kd, optimizer, cls_negative,
                       labels) if args.parts else None
    print(json.dumps({
        "framework": "repdistiller (pytorch)", "method": "crd", "teacher": args.teacher, "student": args.student,
        "batch_size": B, "nce_k": K, "num_train": N, "img_per_s": round(1000 * B / ms, 2),
        "ms_per_step": round(ms, 1), "cpu_ms_per_step": round(1000 * statistics.median(cpu_times), 1),
        "process_cpu_util": round(statistics.median(cpu_times) / statistics.median(times), 2),
        "loader_ms_per_batch": round(loader_ms, 1), "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "cpu": cpu_model(), "final_loss": round(loss, 4), **({"parts_ms": parts} if parts else {}),
    }))


def time_parts(args, batch, model_t, model_s, criterion_cls, criterion_kd, optimizer, cls_negative, labels):
    import torch

    x, y, index, contrast_idx = batch
    reps = max(3, args.steps // 2)

    def clock(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return round(1000 * (time.perf_counter() - t0) / reps, 1)

    def teacher():
        model_t.eval()
        with torch.no_grad():
            model_t(x, is_feat=True)

    def student():
        model_s.train()
        _, logit_s = model_s(x, is_feat=True)
        optimizer.zero_grad()
        criterion_cls(logit_s, y).backward()
        optimizer.step()

    def sampling():
        for i in index.numpy():
            np.random.choice(cls_negative[labels[i]], args.nce_k, replace=False)

    with torch.no_grad():
        model_s.eval()
        f_s = model_s(x, is_feat=True)[0][-1].detach()
        f_t = model_t(x, is_feat=True)[0][-1].detach()

    def crd():
        fs = f_s.clone().requires_grad_(True)
        optimizer.zero_grad()
        criterion_kd(fs, f_t, index, contrast_idx).backward()

    print("timing the parts ...", file=sys.stderr)
    return {"teacher_forward": clock(teacher), "student_fwd_bwd_sgd": clock(student),
            "negatives_sampling": clock(sampling), "crd_loss_fwd_bwd": clock(crd)}


if __name__ == "__main__":
    main()
