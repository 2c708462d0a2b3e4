"""Checkpoints: any tree of tensors, Python scalars and ``None`` in one safetensors file.

``save(path, tree, metadata)`` writes the trees of docs/architecture.md (params, state, optimizer
state, a key, a step counter, or a tuple / dict of them) and ``load(path, like)`` reads them back
bit for bit. The file is a plain safetensors file, so any safetensors reader can inspect it:

* every tensor leaf is stored under its tree path (see ``trees.paths``), e.g.
  ``params/features.0.weight`` or ``opt_state/0/mu/features.0.weight``, as a contiguous CPU copy;
* a Python ``int`` / ``float`` / ``bool`` leaf is stored under its path as a 0-d ``int64`` /
  ``float64`` / ``bool`` tensor (every Python float is exactly a float64; ints must fit in
  int64) and comes back as a Python scalar of the same type;
* ``None`` leaves and the containers are described by the ``"structure"`` entry of the
  safetensors metadata, a JSON tree of nodes::

      {"kind": "dict", "items": {"params": <node>, ...}}
      {"kind": "list" | "tuple", "items": [<node>, ...]}
      {"kind": "namedtuple", "name": "ScaleByAdamState", "items": {"count": <node>, ...}}
      {"kind": "tensor" | "int" | "float" | "bool", "path": "opt_state/0/count"}
      {"kind": "none"}

* the metadata also holds ``"format": "purenn.checkpoint"``, ``"format_version": "1"`` and
  ``"metadata"``, the user's metadata dict as one JSON string.

``load(path)`` rebuilds dicts, lists and tuples from the structure; a NamedTuple comes back as a
dict keyed by its field names (the file does not hold the class). ``load(path, like=template)``
checks the file against the template leaf by leaf and returns a tree of exactly the template's
types (NamedTuples included); any difference raises :class:`CheckpointMismatchError` listing every
missing, unexpected, mis-shaped and mis-typed path at once.

Writes are atomic: the bytes go to a temporary file in the target's directory, which is flushed,
``fsync``-ed and then renamed over the target with ``os.replace``, so the target is always either
the old checkpoint or the complete new one. The whole file is built in memory first (about the
size of the tensors), which is fine for the nets of this project.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, Optional, Union

import safetensors.torch
import torch

from trees import paths as _tree

PathLike = Union[str, "os.PathLike[str]"]

FORMAT = "purenn.checkpoint"
FORMAT_VERSION = 1

# Python scalar leaves and the 0-d tensor dtype each is stored as.
_SCALAR_DTYPES = {"bool": torch.bool, "int": torch.int64, "float": torch.float64}
_SCALAR_TYPES = {"bool": bool, "int": int, "float": float}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_RESERVED_NAME = "__metadata__"  # the safetensors header entry that holds the metadata


class CheckpointError(ValueError):
    """The file is not a readable purenn checkpoint: empty, truncated, corrupted or foreign."""


class CheckpointMismatchError(ValueError):
    """The checkpoint holds a different tree than the ``like`` template given to :func:`load`.

    Attributes ``missing`` and ``unexpected`` are lists of paths (in ``like`` but not in the
    file, and the reverse); ``misshaped`` and ``mistyped`` are lists of
    ``(path, in_file, in_like)`` with shapes or dtypes / leaf types.
    """

    def __init__(self, message, missing, unexpected, misshaped, mistyped):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.misshaped = misshaped
        self.mistyped = mistyped


def _show(path: str) -> str:
    return repr(path) if path else "the root"


def _leaf_kind(x: Any) -> Optional[str]:
    """``"tensor"``, ``"bool"``, ``"int"``, ``"float"``, ``"none"``, or None for anything else."""
    if isinstance(x, torch.Tensor):
        return "tensor"
    if x is None:
        return "none"
    for kind in ("bool", "int", "float"):  # bool first: True is also an int
        if isinstance(x, _SCALAR_TYPES[kind]):
            return kind
    return None


# ----------------------------------------------------------------------------------- save


def _cpu_copy(t: torch.Tensor, path: str) -> torch.Tensor:
    """A contiguous CPU copy sharing no memory with ``t`` or any other leaf."""
    if t.layout != torch.strided:
        raise TypeError(f"save: expected dense (strided) tensors, got a {t.layout} tensor at "
                        f"{_show(path)}; convert it with .to_dense() first")
    if t.device.type == "meta":
        raise ValueError(f"save: expected tensors with data, got a meta tensor at {_show(path)}")
    # A fresh copy for every leaf: safetensors refuses tensors that share storage (tied or
    # viewed leaves), and resolve_* materialises lazy conjugate / negative views.
    t = t.detach().resolve_conj().resolve_neg()
    return t.to(device="cpu", copy=True, memory_format=torch.contiguous_format)


def _encode(node: Any, path: str, tensors: dict) -> dict:
    """The structure node for ``node``; its leaves go into ``tensors`` under their paths."""
    kind = _leaf_kind(node)
    if kind == "tensor":
        tensors[path] = _cpu_copy(node, path)
        return {"kind": "tensor", "path": path}
    if kind == "none":
        return {"kind": "none"}
    if kind is not None:
        if kind == "int" and not _INT64_MIN <= node <= _INT64_MAX:
            raise ValueError(f"save: expected int leaves within int64 range, got {node} at "
                             f"{_show(path)}")
        tensors[path] = torch.tensor(_SCALAR_TYPES[kind](node), dtype=_SCALAR_DTYPES[kind])
        return {"kind": kind, "path": path}
    if isinstance(node, dict):
        return {"kind": "dict", "items": {
            k: _encode(v, _tree.join(path, _tree.check_dict_key(k, path, "save")), tensors)
            for k, v in node.items()}}
    if _tree.is_namedtuple(node):
        return {"kind": "namedtuple", "name": type(node).__qualname__, "items": {
            f: _encode(v, _tree.join(path, f), tensors) for f, v in zip(type(node)._fields, node)}}
    if isinstance(node, (list, tuple)):
        return {"kind": "list" if isinstance(node, list) else "tuple",
                "items": [_encode(v, _tree.join(path, str(i)), tensors)
                          for i, v in enumerate(node)]}
    raise TypeError(f"save: expected a tensor, int, float, bool, None or a dict / list / tuple "
                    f"/ NamedTuple of them at {_show(path)}, got {type(node).__name__}")


def _metadata_json(metadata: Any) -> str:
    if metadata is None:
        return "null"
    if not isinstance(metadata, dict):
        raise TypeError(f"save: expected metadata to be a dict or None, got "
                        f"{type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise type(e)(f"save: expected JSON-serialisable metadata (dicts with str keys, lists, "
                      f"str, int, finite float, bool, None), got {e}") from e
    if json.loads(text) != metadata:
        raise ValueError(f"save: expected metadata that survives a JSON round trip (no tuples, "
                         f"no non-str keys), got {metadata!r}, which reads back as {text}")
    return text


def _write_all(f, data: bytes) -> None:
    """Write ``data`` to the open file ``f`` (a seam for tests that simulate a failed write)."""
    f.write(data)


def _fsync_dir(directory: str) -> None:
    """Make the rename durable too; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either its old content or all of
    ``data``: a fresh temporary file in the same folder, written, ``fsync``-ed and renamed over
    ``path`` (``os.replace``). A ``str`` is written as UTF-8. The folder must exist.

    The one atomic writer of the project: checkpoints, data caches, feature caches, metrics and
    results files all go through it.
    """
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"atomic_write: expected an existing directory for {path!r}, got "
                                f"{directory!r}, which does not exist")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    # os.open with mode 0o666 (not tempfile.mkstemp's 0o600) gives the file the umask's usual
    # permissions; O_EXCL makes sure we never write into someone else's file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def save(path: PathLike, tree: Any, metadata: Optional[dict] = None) -> None:
    """Write ``tree`` and ``metadata`` to the safetensors file ``path``, atomically.

    Args:
      path: the file to write; an existing file is replaced only once the new one is complete.
      tree: a pytree of dicts (str keys without ``"/"``), lists, tuples and NamedTuples whose
        leaves are tensors (any device, any strides; a contiguous CPU copy is stored), Python
        ``int`` / ``float`` / ``bool`` or ``None``.
      metadata: ``None`` or a dict of JSON data that reads back equal (e.g. ``{"epoch": 3}``).

    Example::

        save("run/ckpt.safetensors", {"params": params, "state": state,
                                      "opt_state": opt_state, "step": 1200, "key": key},
             metadata={"model": "model_b", "lr": 0.01})
    """
    path = os.fspath(path)
    meta_text = _metadata_json(metadata)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, "", tensors)
    if _RESERVED_NAME in tensors:
        raise ValueError(f"save: expected no leaf at path {_RESERVED_NAME!r} (safetensors "
                         f"reserves that name), got one")
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
              "structure": json.dumps(structure), "metadata": meta_text}
    try:
        data = safetensors.torch.save(tensors, metadata=header)
    except Exception as e:  # e.g. a dtype safetensors has no code for
        dtypes = sorted({str(t.dtype) for t in tensors.values()})
        raise ValueError(f"save: safetensors could not serialise the tree (dtypes {dtypes}): "
                         f"{e}") from e
    atomic_write(path, data)


# ----------------------------------------------------------------------------------- load


def _read_header(data: bytes, name: str) -> dict:
    """The JSON header of a safetensors file, checked enough to explain what is wrong."""
    size = len(data)
    if size == 0:
        raise CheckpointError(f"load: {name!r} is empty (0 bytes), not a checkpoint")
    if size < 8:
        raise CheckpointError(f"load: {name!r} is {size} bytes, too short for the 8-byte header "
                              f"length that starts a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > size - 8:
        raise CheckpointError(f"load: {name!r} has a bad header length: the first 8 bytes say "
                              f"{header_len} bytes of JSON header follow, but the file holds "
                              f"only {size - 8} (truncated, or not a safetensors file)")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"load: {name!r} has a corrupted header: its {header_len} header "
                              f"bytes are not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"load: {name!r} has a corrupted header: expected a JSON object, "
                              f"got {type(header).__name__}")
    try:
        needed = max((int(entry["data_offsets"][1]) for key, entry in header.items()
                      if key != _RESERVED_NAME), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"load: {name!r} has a corrupted header: a tensor entry lacks "
                              f"valid data_offsets ({e!r})") from e
    held = size - 8 - header_len
    if needed > held:
        raise CheckpointError(f"load: {name!r} is truncated: its header describes {needed} "
                              f"bytes of tensor data, the file holds {held}")
    return header


def _read_meta(header: dict, name: str) -> tuple[Any, Any]:
    """``(structure, user_metadata)`` from the safetensors metadata of a purenn checkpoint."""
    meta = header.get(_RESERVED_NAME)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"load: {name!r} is a safetensors file but not a purenn "
                              f"checkpoint (expected 'format': {FORMAT!r} in its metadata); "
                              f"read plain safetensors files with safetensors.torch.load_file")
    try:
        version = int(meta["format_version"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"load: {name!r} has no valid format_version in its metadata, got "
                              f"{meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"load: {name!r} has format version {version}; this purenn reads "
                              f"up to version {FORMAT_VERSION} (upgrade purenn)")
    parsed = []
    for field in ("structure", "metadata"):
        try:
            parsed.append(json.loads(meta[field]))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"load: {name!r} has a corrupted {field!r} entry in its "
                                  f"metadata ({e!r})") from e
    if not (parsed[1] is None or isinstance(parsed[1], dict)):
        raise CheckpointError(f"load: {name!r} has a corrupted 'metadata' entry: expected a "
                              f"JSON object or null, got {type(parsed[1]).__name__}")
    return parsed[0], parsed[1]


def _decode(node: Any, path: str, tensors: dict, used: set, name: str, device) -> Any:
    """The tree a structure node describes, with default containers (NamedTuple -> dict)."""
    def corrupt(what):
        return CheckpointError(f"load: {name!r} has a corrupted structure at {_show(path)}: "
                               f"{what}")

    if not isinstance(node, dict) or "kind" not in node:
        raise corrupt(f"expected a node with a 'kind', got {node!r:.80}")
    kind = node["kind"]
    if kind == "none":
        return None
    if kind in ("tensor", "int", "float", "bool"):
        if node.get("path") != path:
            raise corrupt(f"expected path {path!r}, got {node.get('path')!r}")
        if path not in tensors:
            raise corrupt("the structure names a tensor the file does not hold")
        used.add(path)
        t = tensors[path]
        if kind == "tensor":
            return t if device is None else t.to(device)
        if t.dtype != _SCALAR_DTYPES[kind] or t.dim() != 0:
            raise corrupt(f"expected a 0-d {_SCALAR_DTYPES[kind]} tensor for a {kind} leaf, "
                          f"got {t.dtype} {tuple(t.shape)}")
        return _SCALAR_TYPES[kind](t.item())
    items = node.get("items")
    if kind in ("dict", "namedtuple") and isinstance(items, dict):
        bad = [k for k in items if _tree.SEP in k]
        if bad:
            raise corrupt(f"expected keys without {_tree.SEP!r}, got {bad[0]!r}")
        return {k: _decode(v, _tree.join(path, k), tensors, used, name, device)
                for k, v in items.items()}
    if kind in ("list", "tuple") and isinstance(items, list):
        out = [_decode(v, _tree.join(path, str(i)), tensors, used, name, device)
               for i, v in enumerate(items)]
        return out if kind == "list" else tuple(out)
    raise corrupt(f"expected kind dict / namedtuple (items an object), list / tuple (items an "
                  f"array), tensor, int, float, bool or none, got kind {kind!r} with items "
                  f"{type(items).__name__}")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    return _leaf_kind(x) or type(x).__name__


def _match(loaded: Any, like: Any, name: str) -> dict:
    """``{path: leaf}`` of ``loaded``, after checking its leaves against ``like``'s."""
    have = dict(_tree.leaves_with_paths(loaded, "load"))
    want = dict(_tree.leaves_with_paths(like, "load (like)"))
    for path, x in want.items():
        if _leaf_kind(x) is None:
            raise TypeError(f"load: expected like's leaves to be tensors, int, float, bool or "
                            f"None, got {type(x).__name__} at {_show(path)}")
    missing = [p for p in want if p not in have]
    unexpected = [p for p in have if p not in want]
    misshaped, mistyped = [], []
    for path in (p for p in want if p in have):
        a, b = have[path], want[path]
        if _leaf_kind(a) != _leaf_kind(b) or (
                isinstance(a, torch.Tensor) and a.dtype != b.dtype):
            mistyped.append((path, _describe(a), _describe(b)))
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            misshaped.append((path, tuple(a.shape), tuple(b.shape)))
    if missing or unexpected or misshaped or mistyped:
        lines = [f"load: {name!r} does not match the structure of like:"]
        for title, paths in (("missing (in like, not in the file)", missing),
                             ("unexpected (in the file, not in like)", unexpected)):
            if paths:
                lines.append(f"  {title}: {len(paths)}")
                lines += [f"    {p or '<root>'}" for p in paths]
        for title, rows in (("mis-shaped", misshaped), ("mis-typed", mistyped)):
            if rows:
                lines.append(f"  {title} (file vs like): {len(rows)}")
                lines += [f"    {p or '<root>'}: file {a}, like {b}" for p, a, b in rows]
        raise CheckpointMismatchError("\n".join(lines), missing, unexpected, misshaped, mistyped)
    return have


def load(path: PathLike, like: Any = None, *,
         device: Union[str, torch.device, None] = None) -> tuple[Any, Any]:
    """Read a checkpoint written by :func:`save`: ``(tree, metadata)``.

    Args:
      path: the checkpoint file.
      like: optional template tree, e.g. ``(params, state, opt.init(params))``. The file must
        hold exactly its leaf paths, with the same leaf types and tensor shapes and dtypes;
        the result then has exactly ``like``'s container types. Without it, dicts, lists and
        tuples are rebuilt and NamedTuples become dicts keyed by field name.
      device: where to put the tensors (default: CPU).

    Returns:
      ``(tree, metadata)``; ``metadata`` is the dict given to ``save`` (or ``None``).

    Raises:
      CheckpointError: the file is empty, truncated, corrupted or not a purenn checkpoint.
      CheckpointMismatchError: the file does not match ``like``; the message lists every
        missing, unexpected, mis-shaped and mis-typed path.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        data = f.read()
    header = _read_header(data, name)
    structure, metadata = _read_meta(header, name)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors' own errors carry no file name
        raise CheckpointError(f"load: {name!r} is not a valid safetensors file: {e}") from e
    used: set[str] = set()
    tree = _decode(structure, "", tensors, used, name, device)
    stray = sorted(set(tensors) - used)
    if stray:
        raise CheckpointError(f"load: {name!r} has a corrupted structure: tensors "
                              f"{stray[:5]} are in the file but not in its structure")
    if like is None:
        return tree, metadata
    leaves = _match(tree, like, name)
    return _tree.map_with_path(lambda p, _: leaves[p], like, "load (like)"), metadata
