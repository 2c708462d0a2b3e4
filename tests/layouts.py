"""Test inputs in every memory layout a layer must accept (shared by the layer parity tests)."""
import torch

LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced")


def with_layout(base, layout):
    """``base``'s values in another memory layout: channels_last, a transposed or a strided view."""
    if layout == "channels_last" and base.dim() == 4:
        return base.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return base.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        big = torch.zeros(base.shape[:-1] + (2 * base.shape[-1],), dtype=base.dtype)
        big[..., ::2] = base
        return big[..., ::2]
    return base


def make_input(shape, seed, dtype, layout, values, *, int_range=(-1, 2), scale=1.0, shift=0.0):
    """A seeded tensor of ``shape`` in ``layout``.

    ``values="ints"`` draws few small integers in ``int_range`` (exact zeros, tied pooling
    windows, constant channels); otherwise ``normal * scale + shift``.
    """
    g = torch.Generator().manual_seed(seed)
    if values == "ints":
        base = torch.randint(*int_range, shape, generator=g).to(dtype)
    else:
        base = torch.randn(shape, generator=g, dtype=dtype) * scale + shift
    return with_layout(base, layout)
