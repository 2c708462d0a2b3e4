"""Explicit random keys in the JAX style, built from a counter-based hash in plain tensor ops.

A *key* is an int64 tensor of shape ``(2,)`` holding two 32-bit words. Nothing here reads or
changes a global generator: the numbers a function returns depend only on the key, the shape and
the dtype, so

* the same key gives the same numbers on every call, on every device (the hash is exact integer
  arithmetic, so CPU and CUDA agree bit for bit);
* ``split`` and ``fold_in`` derive new keys whose streams are independent of each other and of
  their parent;
* every function is a pure composition of tensor ops, so it runs under ``torch.func.grad`` and
  ``torch.func.vmap`` (a batch of keys gives a batch of independent samples).

The generator is ``bits[i] = h(h(h(i xor k0) xor k1) xor k0 xor c)``, where ``h`` is a 32-bit
integer finaliser (xor-shift, multiply, xor-shift, multiply, xor-shift) and ``i`` the flat index of
the element: a small cousin of the counter-based generators (Philox, Threefry) that JAX uses. The
multipliers are below 2**31, so every product of a 32-bit word fits in int64 without overflow.
Its statistical quality is ample for dropout masks, shuffles and initialisation; it is not a
cryptographic generator.

Example::

    >>> k = key(0)
    >>> k_init, k_drop = split(k)
    >>> u = uniform(k_drop, (2, 3))          # same values on every call
    >>> torch.equal(u, uniform(k_drop, (2, 3)))
    True
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

Key = torch.Tensor
Shape = Union[int, Sequence[int], torch.Size]

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x2C1B3C6D
_GOLDEN = 0x9E3779B9
# Domain separators: the words that keep the streams of split, fold_in and sampling apart.
_SPLIT, _FOLD, _SEED = 0x243F6A88, 0x85A308D3, 0x13198A2E
_CHUNK = 1 << 17   # elements hashed per step on the CPU (1 MiB of int64; each pass still splits over the threads)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    # In-place steps act only on the fresh tensor made by the first line (fewer allocations).
    x = x ^ (x >> 16)
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def _hash(k0: torch.Tensor, k1: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Three keyed rounds of the finaliser over ``counter`` (broadcasting); values in [0, 2**32)."""
    x = _mix32(counter ^ k0)
    x = _mix32(x ^ k1)
    return _mix32(x ^ k0 ^ _GOLDEN)


def _shape(shape: Shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        return (shape,)
    return tuple(int(s) for s in shape)


def check_key(key: object, where: str) -> None:
    """Raise a clear error unless ``key`` is an int64 tensor of shape (2,) made by this module."""
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"{where}: expected a random key (int64 tensor of shape (2,) from "
                        f"layers.random.key), got {type(key).__name__}")
    if key.dtype != torch.int64 or tuple(key.shape) != (2,):
        raise ValueError(f"{where}: expected a random key (int64 tensor of shape (2,) from "
                         f"layers.random.key), got {key.dtype} tensor of shape {tuple(key.shape)}")


def key(seed: int, *, device: Union[str, torch.device, None] = None) -> Key:
    """A key from an integer seed: ``(2,)`` int64, two 32-bit words hashed from the seed's 64 bits."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"random.key: expected an int seed, got {type(seed).__name__}")
    seed %= 2**64
    lo = torch.tensor(seed & _MASK32, dtype=torch.int64, device=device)
    hi = torch.tensor(seed >> 32, dtype=torch.int64, device=device)
    counter = torch.tensor([0, 1], dtype=torch.int64, device=device)
    return _hash(lo ^ _SEED, hi, counter)


def split(key: Key, num: int = 2) -> Key:
    """``num`` new keys, shape ``(num, 2)``, independent of each other and of ``key``."""
    check_key(key, "random.split")
    if num < 1:
        raise ValueError(f"random.split: expected num >= 1, got {num}")
    counter = torch.arange(2 * num, dtype=torch.int64, device=key.device).reshape(num, 2)
    return _hash(key[0] ^ _SPLIT, key[1], counter)


def fold_in(key: Key, data: Union[int, torch.Tensor]) -> Key:
    """A new key derived from ``key`` and the integer ``data`` (a step, an epoch, a layer index).

    ``data`` may be a Python int or an integer tensor of shape ``()``; values are taken modulo 2**32.
    """
    check_key(key, "random.fold_in")
    if isinstance(data, torch.Tensor):
        if data.dtype.is_floating_point or data.dtype == torch.bool or data.dim() != 0:
            raise TypeError(f"random.fold_in: expected an integer scalar, got {data.dtype} "
                            f"tensor of shape {tuple(data.shape)}")
        word = data.to(torch.int64) & _MASK32
    elif isinstance(data, int) and not isinstance(data, bool):
        word = torch.tensor(data & _MASK32, dtype=torch.int64, device=key.device)
    else:
        raise TypeError(f"random.fold_in: expected an int, got {type(data).__name__}")
    k0 = _hash(key[0] ^ _FOLD, key[1], word)
    counter = torch.tensor([0, 1], dtype=torch.int64, device=key.device)
    return _hash(k0, key[1] ^ _FOLD, counter)


def _hashed(key: Key, n: int, device: torch.device, finish=None, offset: int = 0) -> torch.Tensor:
    """Words ``_hash(key, offset .. offset+n-1)`` as a flat int64 tensor, or ``finish(words)`` of them.

    ``finish`` maps a flat block of words to a flat block of outputs; it is applied chunk by
    chunk on the CPU, while the words are still in cache.
    """
    key = key.to(device)
    k0, k1 = key[0], key[1]
    finish = finish or (lambda words: words)
    if device.type != "cpu" or n <= _CHUNK or torch.compiler.is_compiling():
        return finish(_hash(k0, k1, torch.arange(offset, offset + n, dtype=torch.int64, device=device)))
    # On the CPU, hash in chunks of 2**17: each of the ~30 integer passes then stays in cache and
    # still splits over the threads. On the 2-core machine the three dropout masks of a Model B
    # step (3.7M words) took 19 ms this way against 44 ms whole-tensor and 46 ms in 2**14 chunks
    # (too many small dispatches); F.dropout on the same tensors took 27 ms.
    return torch.cat([finish(_hash(k0, k1, torch.arange(offset + start, offset + min(n, start + _CHUNK),
                                                        dtype=torch.int64)))
                      for start in range(0, n, _CHUNK)])


def _request(where: str, key: Key, shape: Shape, device, most: int, what: str, offset: int = 0):
    """Check a sampling request: ``(shape tuple, device, element count)``, at most ``most``
    elements counted from the stream's start (``offset`` included)."""
    check_key(key, where)
    shape = _shape(shape)
    device = key.device if device is None else torch.device(device)
    n = math.prod(shape)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{where}: expected offset a whole number >= 0, got {offset!r}")
    if offset + n >= most:
        raise ValueError(f"{where}: at most {what} per key, asked for {offset + n}; split the key")
    return shape, device, n


def bits(key: Key, shape: Shape, *, device: Union[str, torch.device, None] = None,
         offset: int = 0) -> torch.Tensor:
    """Uniform 32-bit words, int64 tensor of ``shape`` with values in [0, 2**32).

    ``offset`` skips that many words of the key's stream: ``bits(k, (b, ...), offset=r * m)``
    (``m`` words per row) equals rows ``r .. r+b-1`` of ``bits(k, (B, ...))``, so a process
    holding a slice of a batch draws exactly that slice's numbers (:mod:`layers.parallel`).
    """
    shape, device, n = _request("random.bits", key, shape, device, 2**32, "2**32 numbers", offset)
    return _hashed(key, n, device, offset=offset).reshape(shape)


def uniform(key: Key, shape: Shape = (), *, dtype: torch.dtype = torch.float32,
            low: float = 0.0, high: float = 1.0,
            device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Uniform floats in ``[low, high)``.

    float32/16/bf16 take 24 bits of one word (``u = (bits >> 8) * 2**-24``); float64 joins two
    words for 53 bits (``u = ((b1 >> 5) * 2**26 + (b2 >> 6)) * 2**-53``).
    """
    if not dtype.is_floating_point:
        raise TypeError(f"random.uniform: expected a floating dtype, got {dtype}")
    shape = _shape(shape)
    if dtype == torch.float64:
        words = bits(key, (2,) + shape, device=device)
        u = ((words[0] >> 5) * 2**26 + (words[1] >> 6)).to(torch.float64) * 2.0**-53
    else:
        u = (bits(key, shape, device=device) >> 8).to(torch.float32) * 2.0**-24
        # Rounding to a narrower dtype can round u up to exactly 1: clamp into [0, 1).
        u = u.to(dtype).clamp_max(1.0 - torch.finfo(dtype).eps / 2)
    if low == 0.0 and high == 1.0:
        return u
    return u * (high - low) + low


def bernoulli(key: Key, p: Union[float, torch.Tensor], shape: Shape,
              *, device: Union[str, torch.device, None] = None,
              resolution_bits: int = 32, offset: int = 0) -> torch.Tensor:
    """Bool tensor of ``shape``, each element True with probability ``p``.

    ``resolution_bits=32`` (the default): element ``i`` is ``bits[i] < round(p * 2**32)``.
    ``resolution_bits=16``: each 32-bit word makes two draws, element ``2j`` from its low half
    and ``2j + 1`` from its high half, ``half < round(p * 2**16)``: half the hashing, and the
    probability is ``p`` rounded to a multiple of ``2**-16`` (off by at most ``7.7e-6``).
    Both are exact for ``p = 0`` (never) and ``p = 1`` (always). ``offset`` skips that many
    draws (as :func:`bits`): the result is elements ``offset ..`` of the flat draw.
    """
    if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
        raise ValueError(f"random.bernoulli: expected p in [0, 1], got {p}")
    if resolution_bits not in (16, 32):
        raise ValueError(f"random.bernoulli: expected resolution_bits 16 or 32, got {resolution_bits!r}")
    if resolution_bits == 32:
        words = bits(key, shape, device=device, offset=offset)
        if isinstance(p, (int, float)):
            return words < round(p * 4294967296.0)
        # In float64, as at 16 bits: p * 2**32 in float16 overflows to inf (every draw True).
        return words.to(torch.float64) < (p.to(torch.float64) * 4294967296.0)
    shape, device, n = _request("random.bernoulli", key, shape, device, 2**33,
                                "2**33 draws at 16 bits", offset)
    if isinstance(p, (int, float)):
        threshold = round(p * 65536.0)
    else:
        if p.dim() != 0:
            raise ValueError("random.bernoulli: resolution_bits=16 takes a scalar p, got a tensor "
                             f"of shape {tuple(p.shape)}")
        threshold = p.to(torch.float64) * 65536.0

    def two_draws(words):   # (m,) words -> (2m,) draws: low half, high half, interleaved
        return torch.stack([(words & 0xFFFF) < threshold, (words >> 16) < threshold], dim=-1).reshape(-1)

    # Draw e of the flat stream is half e % 2 of word e // 2: hash the words holding draws
    # offset .. offset+n-1 and drop the high half of the first word when offset is odd.
    skip = offset % 2
    words = (skip + n + 1) // 2
    return _hashed(key, words, device, two_draws, offset // 2)[skip:skip + n].reshape(shape)


def normal(key: Key, shape: Shape = (), *, dtype: torch.dtype = torch.float32,
           mean: float = 0.0, std: float = 1.0,
           device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Normal samples by Box-Muller: ``r = sqrt(-2 ln(1-u1))`` gives ``r cos(2 pi u2)``, ``r sin(2 pi u2)``."""
    if not dtype.is_floating_point:
        raise TypeError(f"random.normal: expected a floating dtype, got {dtype}")
    shape = _shape(shape)
    n = math.prod(shape)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    k1, k2 = split(key)
    pairs = (n + 1) // 2   # each (u1, u2) pair gives two independent normals
    u1 = uniform(k1, (pairs,), dtype=work, device=device)
    u2 = uniform(k2, (pairs,), dtype=work, device=device)
    radius, angle = torch.sqrt(-2.0 * torch.log1p(-u1)), 2.0 * math.pi * u2
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
    return (z * std + mean).to(dtype).reshape(shape)


def truncated_normal(key: Key, shape: Shape = (), *, lower: float = -2.0, upper: float = 2.0,
                     dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Standard normal restricted to ``[lower, upper]`` by inverting the CDF of a uniform."""
    work = torch.float64
    u = uniform(key, shape, dtype=work, device=device)
    cdf = lambda t: 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))  # noqa: E731
    lo, hi = cdf(lower), cdf(upper)
    z = math.sqrt(2.0) * torch.erfinv(2.0 * (lo + u * (hi - lo)) - 1.0)
    return z.clamp(lower, upper).to(dtype)


def randint(key: Key, shape: Shape, low: int, high: int,
            *, device: Union[str, torch.device, None] = None, offset: int = 0) -> torch.Tensor:
    """Integers in ``[low, high)`` (int64); the range must be below 2**32. ``offset`` skips that
    many draws (as :func:`bits`)."""
    if high <= low:
        raise ValueError(f"random.randint: expected low < high, got [{low}, {high})")
    span = high - low
    if span > 2**32:
        raise ValueError(f"random.randint: range must be at most 2**32, got {span}")
    # Multiply-shift maps a 32-bit word onto [0, span) with bias below span / 2**32.
    words = bits(key, shape, device=device, offset=offset)
    if span <= 2**31:
        return ((words * span) >> 32) + low
    return (words % span) + low


def permutation(key: Key, n: int, *, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """A random permutation of ``range(n)`` (int64): the argsort of ``n`` uniform words.

    Ties between words (probability about n**2 / 2**33) are broken by index, so the result is
    still a permutation and still a function of the key alone.
    """
    words = bits(key, (n,), device=device)
    return torch.argsort(words, stable=True)
