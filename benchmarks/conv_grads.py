"""The three passes of each 3x3 convolution of resnet8x4, XLA:CPU against PyTorch, on the same cores.

    python benchmarks/conv_grads.py [--cores 1] [--batch 64] [--steps 10] [--no-torch]

For each of the student's 3x3 convolutions (CIFAR shapes, NHWC for XLA, channels-last for PyTorch) it times, each
compiled and run alone: the forward pass, the input gradient (dx) and the weight gradient (dw), in ms per batch
(the minimum over 3 rounds of --steps calls). PyTorch's dx and dw are `aten.convolution_backward` with one output
mask each, the kernels its autograd calls. The process is pinned to the first --cores cores before either
framework starts, and PyTorch gets that many threads. Prints a markdown table; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# (height = width, input channels, output channels, stride) of resnet8x4's 3x3 convolutions on 32x32 images.
SHAPES = ((32, 3, 32, 1), (32, 32, 64, 1), (32, 64, 64, 1), (32, 64, 128, 2), (16, 128, 128, 1),
          (16, 128, 256, 2), (8, 256, 256, 1))


def _min_ms(fn, steps: int, sync) -> float:
    sync(fn())
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn()
        sync(out)
        best = min(best, (time.perf_counter() - t0) / steps)
    return 1000 * best


def _xla(shape, batch: int, steps: int) -> tuple[float, float, float]:
    import jax
    import jax.numpy as jnp
    from jax import lax

    hw, cin, cout, stride = shape
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (batch, hw, hw, cin), jnp.float32)
    w = 0.05 * jax.random.normal(kw, (3, 3, cin, cout), jnp.float32)

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = conv(x, w)
    fwd = jax.jit(conv)
    # Each gradient is linear in g and needs no forward output: XLA compiles the one transposed convolution.
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    sync = jax.block_until_ready
    return (_min_ms(lambda: fwd(x, w), steps, sync), _min_ms(lambda: dx(x, w, g), steps, sync),
            _min_ms(lambda: dw(x, w, g), steps, sync))


def _torch(shape, batch: int, steps: int) -> tuple[float, float, float]:
    import torch

    hw, cin, cout, stride = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, hw, hw, generator=gen).contiguous(memory_format=torch.channels_last)
    w = (0.05 * torch.randn(cout, cin, 3, 3, generator=gen)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        g = torch.nn.functional.conv2d(x, w, stride=stride, padding=1)

    def backward(mask):
        return torch.ops.aten.convolution_backward(g, x, w, None, [stride, stride], [1, 1], [1, 1], False, [0, 0],
                                                   1, mask)

    with torch.no_grad():
        return (_min_ms(lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=1), steps, lambda o: o),
                _min_ms(lambda: backward([True, False, False]), steps, lambda o: o),
                _min_ms(lambda: backward([False, True, False]), steps, lambda o: o))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=1, help="pin the process to this many cores (default 1)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true", help="time XLA only")
    args = parser.parse_args(argv)
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= args.cores <= len(available):
        parser.error(f"--cores must be between 1 and {len(available)} (the cores this process may use)")
    os.sched_setaffinity(0, available[:args.cores])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.cores)

    head = "| conv (H=W, Cin→Cout, stride) | XLA fwd | XLA dx | XLA dw |"
    rule = "|---|---|---|---|"
    if not args.no_torch:
        head += " PyTorch fwd | PyTorch dx | PyTorch dw | dw: XLA / PyTorch |"
        rule += "---|---|---|---|"
    rows, totals = [], [0.0] * 6
    for shape in SHAPES:
        print(f"conv {shape} ...", file=sys.stderr, flush=True)
        times = list(_xla(shape, args.batch, args.steps))
        if not args.no_torch:
            times += _torch(shape, args.batch, args.steps)
        totals = [a + b for a, b in zip(totals, times)]
        hw, cin, cout, stride = shape
        cells = [f"{t:.1f}" for t in times]
        if not args.no_torch:
            cells.append(f"{times[2] / times[5]:.1f}×")
        rows.append(f"| {hw}×{hw}, {cin}→{cout}, {stride} | " + " | ".join(cells) + " |")
    cells = [f"**{t:.1f}**" for t in totals[:len(times)]]
    if not args.no_torch:
        cells.append(f"**{totals[2] / totals[5]:.1f}×**")
    rows.append("| all seven | " + " | ".join(cells) + " |")
    print(f"ms per batch of {args.batch}, {args.cores} core(s)")
    print("\n".join([head, rule] + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
