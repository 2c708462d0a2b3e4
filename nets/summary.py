"""A per-layer table of a net: output shape, parameter count and multiply-adds, by shape rules.

Nothing is run and no parameter is drawn: every number comes from the layer records'
``output_shape``, ``macs`` and ``param_shapes`` (see :mod:`nets.compose`). The tests hold the
predicted shapes equal to the ones ``apply`` produces, layer by layer.

Counting conventions: ``params`` counts trainable parameters (batch-norm running statistics are
state, reported separately in the footer); multiply-adds count one per ``a * b + c`` for the
given input shape (so for the whole batch): ``N Co Ho Wo Ci kh kw`` for a conv, ``N in out`` for
a linear layer, one per element for batch norm (its normalisation folds into ``a x + b``), and
zero for ReLU, pooling, flatten and dropout.
"""
import dataclasses
import math
import sys
from typing import List, Tuple, Union

from .compose import Layer, Net, leaves


@dataclasses.dataclass(frozen=True)
class Row:
    """One leaf layer: its full name, a description, its output shape and its costs."""
    name: str
    kind: str
    output_shape: Tuple[int, ...]
    params: int
    macs: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """The rows of :func:`summary` in the order ``apply`` runs them, totals and the ``table``."""
    name: str
    input_shape: Tuple[int, ...]
    rows: List[Row]
    output_shape: Tuple[int, ...]
    total_params: int
    total_state: int
    total_macs: int
    table: str

    def __str__(self):
        return self.table


def _format(name, input_shape, rows, totals):
    header = ("layer", "kind", "output shape", "params", "mult-adds")
    body = [(r.name, r.kind, str(r.output_shape), f"{r.params:,}", f"{r.macs:,}") for r in rows]
    total_params, total_state, total_macs, output_shape = totals
    footer = ("total", "", str(output_shape), f"{total_params:,}", f"{total_macs:,}")
    widths = [max(len(line[i]) for line in [header, footer] + body) for i in range(5)]

    def line(cells):
        left = [c.ljust(w) for c, w in zip(cells[:3], widths[:3])]
        right = [c.rjust(w) for c, w in zip(cells[3:], widths[3:])]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([f"{name}: input {tuple(input_shape)}", line(header), rule]
                     + [line(b) for b in body]
                     + [rule, line(footer),
                        f"state (batch-norm running statistics): {total_state:,} numbers; "
                        f"{total_macs / 1e6:,.1f} M multiply-adds for this input"])


def summary(net: Union[Net, Layer], input_shape, *, show: bool = True, file=None) -> Summary:
    """Predict every layer's output shape and cost for an input of ``input_shape``.

    Args:
      net: a :class:`~nets.compose.Net` (or a bare :class:`~nets.compose.Layer`).
      input_shape: the full shape of ``x`` given to ``apply``, batch axis included, e.g.
        ``(1, 3, 32, 32)``; multiply-adds are for that whole batch.
      show: print the table (to ``file``, default stdout).

    Returns:
      :class:`Summary` with one :class:`Row` per leaf layer and the totals.

    Raises:
      ValueError: a layer cannot take the shape reaching it; the message names the layer.
    """
    if isinstance(net, Net):
        name, layer = net.name, net.layer
    elif isinstance(net, Layer):
        name, layer = net.kind, net
    else:
        raise TypeError(f"summary: expected a nets Net or Layer, got {type(net).__name__}")
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise TypeError(f"summary: expected input_shape to be a tuple of ints, got {input_shape!r}")
    start = shape
    rows = []
    for path, leaf in leaves(layer):
        try:
            macs = leaf.macs(shape)
            shape = tuple(leaf.output_shape(shape))
        except ValueError as err:
            raise ValueError(f"summary({name}): layer {path} ({leaf.kind}) cannot take input "
                             f"{shape}: {err}") from err
        params = sum(math.prod(s) for s in leaf.param_shapes.values())
        rows.append(Row(path, leaf.kind, shape, params, macs))
    total_params = sum(r.params for r in rows)
    total_state = sum(math.prod(s) for s in layer.state_shapes.values())
    total_macs = sum(r.macs for r in rows)
    table = _format(name, start, rows, (total_params, total_state, total_macs, shape))
    if show:
        print(table, file=file if file is not None else sys.stdout)
    return Summary(name, start, rows, shape, total_params, total_state, total_macs, table)
