"""Strict JSON files: what every run folder's ``config.json``, ``metrics.jsonl`` and
``results.json`` are written and read with.

Strict means what the JSON standard allows: a diverged member's NaN or infinite loss is written
as ``null``, never as ``NaN`` (which Python writes by default and other readers refuse). A
damaged file is refused in one line (:class:`DamagedFileError`) naming the file and the line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nets.checkpoint import atomic_write

__all__ = ["DamagedFileError", "strict", "dumps", "write_json", "read_json", "write_jsonl",
           "read_jsonl"]


class DamagedFileError(ValueError):
    """A JSON file of a run folder that cannot be read (one line: the file, the line, why)."""


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON's ``null``); tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`strict` ``(obj)``, refusing anything that is not standard JSON."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented strict JSON at ``path`` (atomically; the folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, dumps(obj, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; :class:`DamagedFileError` (one line) when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFileError(f"{path}: expected JSON, got a damaged file ({_why(err)}); "
                               "restore it or start a new run") from None


def write_jsonl(path: str | Path, rows: list) -> None:
    """``rows`` as strict JSON lines (atomically)."""
    atomic_write(Path(path), "".join(dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list:
    """The rows of a JSON-lines file (blank lines skipped); :class:`DamagedFileError` (one line)
    naming the first line that is not a JSON object."""
    path = Path(path)
    rows = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise DamagedFileError(f"{path}: expected JSON lines, got a damaged file ({_why(err)})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DamagedFileError(f"{path}: expected one JSON object per line, got a damaged "
                                   f"line {number} ({_why(err)})") from None
        if not isinstance(row, dict):
            raise DamagedFileError(f"{path}: expected one JSON object per line, got "
                                   f"{type(row).__name__} on line {number}")
        rows.append(row)
    return rows


def _why(err: Exception) -> str:
    return str(err).splitlines()[0]
