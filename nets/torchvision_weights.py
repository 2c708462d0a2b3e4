"""Read a torchvision VGG16 checkpoint (``vgg16-397923af.pth``, ``vgg16_bn-6c64b313.pth``, or any
``torch.save(model.state_dict(), path)`` of ``torchvision.models.vgg16`` / ``vgg16_bn``) into the
``(params, state)`` of :func:`nets.vgg16`.

The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``: only tensors,
dicts and other plain containers are unpickled, so a file carrying any other pickled object is
refused before that object's code could run.

Replacing the head: with ``num_classes`` different from the checkpoint's, the checkpoint's last
classifier layer (``classifier.6.weight``, ``classifier.6.bias``) is dropped and the returned
``params`` lack those two keys. Draw the new head from a fresh init::

    net = nets.vgg16(num_classes=256)
    loaded, state = nets.load_torchvision_weights("vgg16-397923af.pth", num_classes=256)
    key = nets.leaf_keys(net, layers.random.key(0))["classifier.6"]   # the whole init's key
    head, _ = nets.child(net, "classifier.6").init(key)                # draws that layer only
    params = {**loaded, **{f"classifier.6.{k}": v for k, v in head.items()}}
"""
import pickle
from typing import Optional

import torch

from .vgg16 import vgg16

_HEAD = ("classifier.6.weight", "classifier.6.bias")


def _reason(err):
    """``KeyError: 101``: the error's type and the most specific line of its (long) message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if "error" in line.lower() or "unsupported" in line.lower()]
    line = (specific or lines or [""])[-1]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _first_bytes(path, n=16):
    """The file's first ``n`` bytes, or None: an HTML error page saved as .pth shows itself."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except (OSError, TypeError):
        return None


def _read_state_dict(path, where):
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        # Bytes that are no torch file fail in many ways: UnpicklingError, EOFError (empty or cut
        # short), RuntimeError (a damaged zip), and, for a stray pickle opcode, KeyError,
        # IndexError, struct.error or UnicodeDecodeError (text starting with "h" reads as BINGET
        # of memo 101: a bare "KeyError: 101"). Each is one ValueError naming the file.
        refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if isinstance(err, pickle.UnpicklingError) and refused:
            raise ValueError(f"{where}: expected {path} to hold a plain state dict of tensors; it "
                             f"carries other pickled objects, which are refused (torch.load with "
                             f"weights_only=True said: {refused[0]})") from err
        head = _first_bytes(path)
        raise ValueError(f"{where}: expected {path} to be a torchvision VGG16 state dict (.pth), "
                         f"but torch.load could not read it: {_reason(err)}"
                         + ("" if head is None else f" (the file begins with {head!r})")) from err
    if not isinstance(sd, dict):
        raise ValueError(f"{where}: expected {path} to hold a state dict (a dict of tensors), "
                         f"got {type(sd).__name__}")
    bad = sorted(str(k) for k, v in sd.items()
                 if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{where}: expected {path} to map parameter names to tensors (keys like "
                         f"'features.0.weight'), got non-tensor entries at {bad[:10]}"
                         + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
    return sd


def load_torchvision_weights(path, *, num_classes: Optional[int] = None,
                             batch_norm: Optional[bool] = None,
                             truncate_after_block: Optional[int] = None):
    """``(params, state)`` for ``nets.vgg16(num_classes, batch_norm, truncate_after_block)``.

    Args:
      path: a torchvision VGG16 state-dict ``.pth`` file.
      num_classes: ``None`` keeps the checkpoint's head; a number equal to the checkpoint's
        keeps it too; any other number drops ``classifier.6.*`` (init a new head, see above).
      batch_norm: ``None`` detects the variant (``vgg16_bn`` has batch norm at ``features.1``);
        ``True``/``False`` insists on it and raises if the file is the other variant.
      truncate_after_block: keep only the ``features`` of blocks ``1..k`` (see :func:`nets.vgg16`).

    Returns:
      ``(params, state)``: flat dicts of the checkpoint's tensors under the same names; ``state``
      holds the batch-norm running statistics (``{}`` for plain ``vgg16``). A ``vgg16_bn`` file
      saved without ``num_batches_tracked`` gets zeros there.

    Raises:
      ValueError: the file is damaged (truncated, not a torch file: whatever torch.load raised
        on it, with the file's first bytes), carries pickled non-tensor objects, is not a dict
        of tensors, or its keys or shapes are not those of a VGG16 (the message lists missing,
        unexpected and mis-shaped keys).
      FileNotFoundError: there is no file at ``path``.
    """
    where = "load_torchvision_weights"
    if batch_norm is not None and not isinstance(batch_norm, bool):
        raise TypeError(f"{where}: expected batch_norm to be None or a bool, got {batch_norm!r}")
    sd = _read_state_dict(path, where)

    detected_bn = "features.1.weight" in sd or "features.1.running_mean" in sd
    if batch_norm is not None and batch_norm != detected_bn:
        raise ValueError(f"{where}: expected a {'vgg16_bn' if batch_norm else 'vgg16'} checkpoint "
                         f"(batch_norm={batch_norm}), got a "
                         f"{'vgg16_bn' if detected_bn else 'vgg16'} one in {path}")
    head = sd.get("classifier.6.weight")
    file_classes = int(head.shape[0]) if head is not None and head.dim() == 2 else 1000
    if detected_bn:
        for k in list(sd):
            if k.endswith(".running_mean"):
                count = k[:-len("running_mean")] + "num_batches_tracked"
                sd.setdefault(count, torch.zeros((), dtype=torch.int64))

    # Check the whole file against the full net it claims to be, then keep what was asked for.
    full = vgg16(num_classes=file_classes, batch_norm=detected_bn).layer
    expected = {**full.param_shapes, **full.state_shapes}
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    misshaped = sorted(f"{k}: expected {tuple(expected[k])}, got {tuple(sd[k].shape)}"
                       for k in expected.keys() & sd.keys()
                       if tuple(sd[k].shape) != tuple(expected[k]))
    if missing or unexpected or misshaped:
        raise ValueError(f"{where}: {path} is not a torchvision "
                         f"{'vgg16_bn' if detected_bn else 'vgg16'} state dict: missing keys "
                         f"{missing}, unexpected keys {unexpected}, mis-shaped keys {misshaped}")

    if num_classes is not None and num_classes != file_classes:
        sd = {k: v for k, v in sd.items() if k not in _HEAD}
    kept = vgg16(num_classes=num_classes or file_classes, batch_norm=detected_bn,
                 truncate_after_block=truncate_after_block).layer
    params = {k: sd[k] for k in kept.param_shapes if k in sd}
    state = {k: sd[k] for k in kept.state_shapes}
    return params, state
