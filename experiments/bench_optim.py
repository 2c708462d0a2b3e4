"""Benchmark: one optimizer update of ours against torch.optim (foreach=True) on VGG16-shaped trees.

    python -m experiments.bench_optim [--reps 15] [--quick] [--dtype float32|float64] [--no-recycle]

Builds a parameter tree with torchvision's vgg16 shapes (13 conv weights / biases and 3 linear
layers, 138M parameters; ``--quick`` divides every dimension's channel counts so the tree is about
1/16 of that) and random gradients. For SGD (Nesterov, momentum 0.9, weight decay 5e-4) and Adam
it times, interleaved in one process (ours, torch, ours, torch, ...), the median of:

    ours (fused):   params, state = optim.step(opt, grads, state, params)
    ours (update):  updates, state = opt.update(...); params = optim.apply_updates(...)
    torch.optim:    opt.step()   (grads already in .grad, foreach=True)

and prints the ratio ours / torch. Each side keeps its own trajectory, as a training loop would.
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import torch

import optim
import optim.buffers


def vgg16_shapes(quick: bool) -> dict[str, tuple[int, ...]]:
    """torchvision vgg16's state_dict shapes (built on the meta device: no memory, no init)."""
    import torchvision
    with torch.device("meta"):
        model = torchvision.models.vgg16(weights=None)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if quick:
        shapes = {k: tuple(max(1, d // 4) if i < 2 else d for i, d in enumerate(s)) for k, s in shapes.items()}
    return shapes


def make_tree(shapes, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def bench(name, ours, theirs, shapes, dtype, reps, warmup=2):
    params = make_tree(shapes, dtype, 0)
    grads = make_tree(shapes, dtype, 1, scale=1e-3)
    tparams = [p.clone().requires_grad_(True) for p in params.values()]
    for tp, g in zip(tparams, grads.values()):
        tp.grad = g
    topt = theirs(tparams)

    fused_p, fused_s = params, ours.init(params)
    unfused_p, unfused_s = {k: v.clone() for k, v in params.items()}, ours.init(params)
    times = {"ours (fused step)": [], "ours (update + apply_updates)": [], "torch.optim foreach": []}

    def run_fused():
        nonlocal fused_p, fused_s
        fused_p, fused_s = optim.step(ours, grads, fused_s, fused_p)

    def run_unfused():
        nonlocal unfused_p, unfused_s
        updates, unfused_s = ours.update(grads, unfused_s, unfused_p)
        unfused_p = optim.apply_updates(unfused_p, updates)

    def run_torch():
        topt.step()

    runs = {"ours (fused step)": run_fused, "ours (update + apply_updates)": run_unfused,
            "torch.optim foreach": run_torch}
    with torch.no_grad():
        for i in range(warmup + reps):
            for label, fn in runs.items():
                gc.collect()
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[label].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["torch.optim foreach"]
    for label, m in med.items():
        print(f"| {name} | {label} | {m * 1e3:9.1f} | {m / ref:5.2f} |")
    # The fused trajectory is torch's, operation for operation.
    err = max((a - b.detach()).abs().max().item() for a, b in zip(fused_p.values(), tparams))
    print(f"|  | (max abs difference fused vs torch after {warmup + reps} steps: {err:.1e}) | | |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per implementation")
    ap.add_argument("--quick", action="store_true", help="a ~1/16-size tree instead of 138M parameters")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--no-recycle", action="store_true",
                    help="allocate every output fresh (disable optim.buffers) to see what recycling buys")
    args = ap.parse_args(argv)
    if args.no_recycle:
        optim.buffers.MIN_BYTES = float("inf")
    dtype = getattr(torch, args.dtype)
    shapes = vgg16_shapes(args.quick)
    n = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"# {n / 1e6:.1f}M parameters in {len(shapes)} tensors, {args.dtype}, {args.reps} reps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f"{', recycling off' if args.no_recycle else ''}")
    print("| optimizer | implementation | median ms / update | ratio to torch |")
    print("| --- | --- | ---: | ---: |")
    bench("SGD nesterov m=0.9 wd=5e-4",
          optim.sgd(0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
          lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True),
          shapes, dtype, args.reps)
    bench("Adam", optim.adam(1e-3), lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
          shapes, dtype, args.reps)


if __name__ == "__main__":
    main()
