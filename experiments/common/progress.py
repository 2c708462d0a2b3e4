"""Progress of a training run on a stream: a redrawn bar on a terminal, whole lines elsewhere."""
from __future__ import annotations

import math
import sys
import time

__all__ = ["ProgressBar", "LineWriter", "format_seconds", "history_table"]


def format_seconds(seconds: float) -> str:
    """``75 -> "01:15"``, ``3725 -> "1:02:05"``."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class ProgressBar:
    """Progress of one epoch on ``stream`` (default stderr).

    On a terminal, a one-line bar redrawn in place (carriage return) at most every ``interval``
    seconds. On anything else (a log file, a pipe), whole lines only, never a carriage return:
    a status line at most every ``line_interval`` seconds, so ``nohup ... > log`` stays readable.
    ``close(line)`` always prints ``line`` (the epoch's summary) on a line of its own.
    ``total=None`` counts without a bar or ETA (a stream of unknown length).
    """

    def __init__(self, total: int | None, desc: str, stream=None, interval: float = 0.25,
                 enabled: bool | None = None, line_interval: float = 60.0):
        self.total, self.desc = total, desc
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if enabled is None else enabled
        self.interval = interval if self.tty else line_interval
        self.start = time.perf_counter()
        self.last = self.start
        self.drawn = False

    def update(self, done: int, images: int, **metrics: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval and (self.total is None or done < self.total or not self.tty):
            return
        self.last = now
        elapsed = now - self.start
        rate = images / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - done) if done and self.total else float("nan")
        parts = " ".join(f"{k} {v:.4f}" if k == "loss" else f"{k} {100 * v:.2f}%"
                         for k, v in metrics.items())
        eta_s = format_seconds(eta) if math.isfinite(eta) else "--:--"
        if self.total is None:
            start, end = ("\r", " \x1b[K") if self.tty else ("", "\n")
            self.stream.write(f"{start}{self.desc}: {done} {parts} {rate:.0f}/s{end}")
            self.drawn = self.tty
        elif self.tty:
            width = 20
            fill = int(width * done / max(self.total, 1))
            self.stream.write(f"\r{self.desc} {done}/{self.total} [{'#' * fill}{'.' * (width - fill)}] "
                              f"{parts} {rate:.0f} img/s ETA {eta_s} \x1b[K")
            self.drawn = True
        else:
            self.stream.write(f"{self.desc} {done}/{self.total} {parts} {rate:.0f} img/s ETA {eta_s}\n")
        self.stream.flush()

    def close(self, line: str) -> None:
        self.stream.write(("\r\x1b[K" if self.drawn else "") + line + "\n")
        self.stream.flush()


def member_mean(value):
    """A display number: the value, or the mean over the members whose value is finite."""
    if not isinstance(value, list):
        return value
    finite = [v for v in value if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def history_table(history: list[dict]) -> str:
    """The per-epoch rows of a run as a fixed-width text table (missing values as ``-``)."""
    def pct(v):
        return f"{100 * v:6.2f}" if v is not None else "     -"

    def num(v):
        return f"{v:6.4f}" if v is not None else "     -"

    def live(row):   # an ensemble's values: the mean over the members that did not diverge
        bad = row.get("diverged") or []
        return {k: member_mean([x for i, x in enumerate(v) if not (i < len(bad) and bad[i])])
                if isinstance(v, list) and k != "diverged" else v for k, v in row.items()}

    history = [live(h) for h in history]
    lines = ["epoch  train_loss train_acc  val_loss val_acc  test_loss test_acc        lr    sec",
             "-----  ---------- ---------  -------- -------  --------- --------  -------- ------"]
    for h in history:
        lines.append(f"{h['epoch']:5d}  {num(h['train_loss']):>10} {pct(h['train_accuracy']):>9}  "
                     f"{num(h.get('val_loss')):>8} {pct(h.get('val_accuracy')):>7}  "
                     f"{num(h.get('test_loss')):>9} {pct(h.get('test_accuracy')):>8}  "
                     f"{h.get('lr') or float('nan'):8.2e} {h['seconds']:6.1f}")
    return "\n".join(lines)


class LineWriter:
    """A write-only text stream that hands each complete line to ``log(line)`` (not a terminal,
    so a :class:`ProgressBar` on it writes whole lines)."""

    def __init__(self, log):
        self.log, self.pending = log, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.log(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
