"""Out-of-place foreach operations that write into recycled storage.

Why: a pure optimizer returns new parameters and new state instead of overwriting the old ones,
so each update needs fresh output tensors. On CUDA torch's caching allocator hands back freed
blocks, but on CPU a large block (above glibc's 32 MiB mmap threshold: VGG16's linear weights)
goes back to the OS when freed and the next one is page-faulted in and zeroed by the kernel,
which costs several passes over memory (a fresh 400 MB output makes an ``add`` about 5x slower
than writing into memory already mapped). This module keeps the large tensors this package
allocated and, when nothing else references one any more (the caller dropped the old params /
state, or it was a temporary), writes the next output of the same shape into it.

A buffer is reused only when the pool holds the sole reference: Python refcount, the TensorImpl's
use count and the storage's use count all say nobody else (no other name, no view, no autograd
graph, no numpy array) can see it, so no tensor reachable by the caller is ever written. (A
``weakref`` to a dropped tensor is the one observer this cannot see.) Only plain CPU tensors that
do not require grad and are not torch.func-wrapped take this path; everything else, CUDA
included, uses the ``torch._foreach_*`` op itself. On CPU ``torch._foreach_*`` is a loop of the
per-tensor op, so writing ``out=`` per tensor runs the same kernels: results are bit-identical.

``release_buffers()`` drops the pool (memory returns to the OS as the tensors die).
"""
from __future__ import annotations

import sys
import threading
import torch

MIN_BYTES = 1 << 20          # smaller tensors come from malloc's free lists cheaply anyway
MAX_POOLED = 1024            # pool length cap; the oldest entries are dropped first

_pool: list = []
_lock = threading.Lock()   # two threads stepping at once must not take the same buffer


def release_buffers() -> None:
    """Forget every recycled buffer (their memory is freed once nobody else holds them)."""
    with _lock:
        _pool.clear()


def pooled_count() -> int:
    """Number of tensors the pool currently holds (in use by someone or free)."""
    return len(_pool)


def _functorch_wrapped(x: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def recyclable(*lists) -> bool:
    """True when every tensor is a plain CPU tensor outside autograd and torch.func."""
    for xs in lists:
        for x in xs:
            if (x.device.type != "cpu" or x.requires_grad or x.is_sparse
                    or _functorch_wrapped(x)):
                return False
    return True


def _take(like: torch.Tensor):
    with _lock:
        return _take_locked(like)


def _take_locked(like: torch.Tensor):
    if like.numel() * like.element_size() < MIN_BYTES:
        return None
    for i in range(len(_pool)):
        t = _pool[i]   # (not enumerate: its cached result tuple would hold a reference)
        if not (t.shape == like.shape and t.dtype == like.dtype and t.device == like.device
                and t.is_contiguous()):
            continue
        # The pool holds the only reference when the Python object is referenced by exactly the
        # pool's slot, the loop variable ``t`` and getrefcount's argument; the TensorImpl has one
        # owner (no view, no autograd node); the storage has one owner plus the temporary Python
        # storage object made to ask.
        if (sys.getrefcount(t) == 3 and t._use_count() == 1
                and torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2):
            del _pool[i]
            return t
    return None


def _keep(ts) -> None:
    with _lock:
        _keep_locked(ts)


def _keep_locked(ts) -> None:
    for t in ts:
        if t.numel() * t.element_size() >= MIN_BYTES and t.device.type == "cpu":
            _pool.append(t)
    while len(_pool) > MAX_POOLED:
        del _pool[0]


def _outputs(op, like, args_of):
    """Run ``op(*args_of(i), out=buf)`` per tensor into recycled buffers (fresh where none is
    free) and pool the results."""
    out = []
    for i, x in enumerate(like):
        buf = _take(x)
        if buf is None:
            buf = torch.empty_like(x, memory_format=torch.contiguous_format)
        op(*args_of(i), out=buf)
        out.append(buf)
    _keep(out)
    return out


def add(xs, ys, alpha=1.0):
    """``[x + alpha * y]`` (``torch._foreach_add(xs, ys, alpha=alpha)``)."""
    if not xs or not recyclable(xs, ys):
        return torch._foreach_add(xs, ys, alpha=alpha) if xs else []
    return _outputs(lambda x, y, out: torch.add(x, y, alpha=alpha, out=out), xs,
                    lambda i: (xs[i], ys[i]))


def mul(xs, scalar):
    """``[x * scalar]`` (``torch._foreach_mul(xs, scalar)``), scalar a Python number or a list."""
    if not xs or not recyclable(xs):
        return torch._foreach_mul(xs, scalar) if xs else []
    s = scalar if isinstance(scalar, list) else [scalar] * len(xs)
    return _outputs(lambda x, c, out: torch.mul(x, c, out=out), xs, lambda i: (xs[i], s[i]))


def lerp(xs, ys, weight):
    """``[x + weight * (y - x)]`` (``torch._foreach_lerp(xs, ys, weight)``)."""
    if not xs or not recyclable(xs, ys):
        return torch._foreach_lerp(xs, ys, weight) if xs else []
    return _outputs(lambda x, y, out: torch.lerp(x, y, weight, out=out), xs,
                    lambda i: (xs[i], ys[i]))


def sqrt(xs):
    """``[sqrt(x)]`` (``torch._foreach_sqrt(xs)``)."""
    if not xs or not recyclable(xs):
        return torch._foreach_sqrt(xs) if xs else []
    return _outputs(lambda x, out: torch.sqrt(x, out=out), xs, lambda i: (xs[i],))


def maximum(xs, ys):
    """``[max(x, y)]`` elementwise (``torch._foreach_maximum(xs, ys)``)."""
    if not xs or not recyclable(xs, ys):
        return torch._foreach_maximum(xs, ys) if xs else []
    return _outputs(lambda x, y, out: torch.maximum(x, y, out=out), xs,
                    lambda i: (xs[i], ys[i]))


def addcdiv(xs, ns, ds, values):
    """``[x + value * n / d]`` (``torch._foreach_addcdiv(xs, ns, ds, values)``), values a list."""
    if not xs or not recyclable(xs, ns, ds):
        return torch._foreach_addcdiv(xs, ns, ds, values) if xs else []
    return _outputs(lambda x, n, d, v, out: torch.addcdiv(x, n, d, value=v, out=out), xs,
                    lambda i: (xs[i], ns[i], ds[i], values[i]))


def clone(xs):
    """Copies of ``xs``."""
    if not xs or not recyclable(xs):
        return [x.clone() for x in xs]
    return _outputs(lambda x, out: out.copy_(x), xs, lambda i: (xs[i],))
