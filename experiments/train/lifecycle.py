"""The run lifecycle: one object owns a run folder from the command line to the exit status.

    run_dir = run_folder(args.out, cfg.name)                     # --name cannot leave --out
    run = open_run(run_dir, cfg, command="python -m experiments.sweep", resume=bool(args.resume))
    result, code = run.guarded(lambda: fit(run.config, ..., run=run))
    return code                                                  # 0, 1, 2 or 130

:func:`open_run` decides new against resume and compares the requested config with the stored
one. On a rerun or ``--resume`` with changed settings it does exactly one of two things:

* it **continues** where that is sound: a setting of the config's ``resumable`` changed (the
  data folder or the device moved), or more epochs of a run whose learning rate does not depend
  on its length (a constant schedule, no lookahead);
* or it **refuses** (:class:`RunRefused`, one line naming each differing setting) and leaves the
  folder untouched.

It never hands back a config that the checkpoint was not trained under, so a study's tables,
computed from what its run folders hold, always describe what was trained.

The run folder::

    runs/<name>/
      config.json              the run's config (Settings.to_json), rewritten when it continues
      checkpoint.safetensors   params, state, opt_state, train key, progress and config: one
                               file, replaced atomically after every epoch (and on Ctrl-C / kill)
      metrics.jsonl            one strict-JSON line per completed epoch
"""
from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nets.checkpoint import CheckpointError

from ..common.files import DamagedFileError, read_json, read_jsonl, write_json, write_jsonl
from ..common.settings import Difference, Settings, SettingsError
from .runs import CHECKPOINT, CONFIG, METRICS, load_run, read_checkpoint_meta, save_checkpoint

__all__ = ["RunRefused", "Run", "open_run", "resumed_config", "stored_config", "refuse_differences", "interrupts_deferred", "run_folder", "NonFiniteLossError",
           "sigterm_as_interrupt", "EXIT_OK", "EXIT_DIVERGED", "EXIT_REFUSED",
           "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_DIVERGED, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


class RunRefused(ValueError):
    """What a command cannot do with a run folder, in one line; the folder is left as it was."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is left as it was."""


def run_folder(out: str | Path, name: str) -> Path:
    """``out/name``, refused when ``name`` is empty, absolute or climbs out of ``out`` (``../x``)."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise RunRefused(f"--name: expected a folder name inside --out ({out}), got {name!r}")
    return Path(out) / name


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, ``kill PID`` (SIGTERM) raises KeyboardInterrupt, so a background run
    saves its checkpoint as Ctrl-C does; the previous handler comes back after (nothing changes
    where handlers cannot be set: not the main thread)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred():
    """Within the block, Ctrl-C (SIGINT) and ``kill`` (SIGTERM) wait: a signal that arrives is
    raised as KeyboardInterrupt when the block ends, so a step that writes its results into the
    storage of its inputs (a donated optimizer step) is never stopped half-way. Nothing changes
    where handlers cannot be set (not the main thread)."""
    caught = []
    try:
        previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


def _epochs_problem(stored: Settings, requested: Settings, done: int) -> str | None:
    """Why ``stored``'s run cannot continue to ``requested.epochs`` epochs (None: it can)."""
    spans = getattr(stored, "schedule_spans_run", None)
    if spans is not None and spans():
        what = ("lookahead decay" if getattr(stored, "lookahead", False)
                and getattr(stored, "schedule", "constant") == "constant"
                else f"{getattr(stored, 'schedule', '')} schedule".strip())
        return f"its {what} spans them, so other epochs would change steps already taken"
    if requested.epochs < done:
        return f"it has already completed {done}"
    return None


def refuse_differences(where: Path | str, what: str, diffs: Sequence[Difference],
                       instead: str, why: dict[str, str] | None = None) -> RunRefused:
    """The one refusal of a rerun or resume with changed settings: ``<where> holds <what> with
    other settings: --lr 0.5 (the run's: 0.1) (why); ... It is left as it was: <instead>``."""
    why = why or {}
    shown = "; ".join(f"{d}" + (f" ({why[d.name]})" if why.get(d.name) else "") for d in diffs)
    return RunRefused(f"{where} holds {what} with other settings: {shown}. It is left as it "
                      f"was: {instead}")


@dataclass
class Run:
    """An open run folder: the config it trains (``config``), whether it continues a checkpoint
    (``resumed``), the command that continues it (``resume_hint``), and what :func:`fit` calls
    to restore and save it. ``after_epoch`` receives ``(run, history, results, classes)``
    after every saved epoch (the plots: :mod:`experiments.report` is handed in by the command,
    the trainer does not import it)."""

    dir: Path
    config: Settings
    resumed: bool
    command: str
    writes: bool = True
    after_epoch: list[Callable] = field(default_factory=list)
    hint: str | None = None

    @property
    def resume_hint(self) -> str:
        """The command that continues the run: ``hint`` when the command has its own way (a
        study that continues when it is run again), else ``<command> --resume <dir>``."""
        return self.hint or f"{self.command} --resume {self.dir}"

    @property
    def checkpoint(self) -> Path:
        return self.dir / CHECKPOINT

    # ---- what fit calls ------------------------------------------------------------------
    def begin(self, params, state, opt_state, key) -> None:
        """A new run: the folder, its config, an empty history and the first checkpoint."""
        if not self.writes:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / CONFIG, self.config.to_json())
        write_jsonl(self.dir / METRICS, [])
        save_checkpoint(self.checkpoint, params, state, opt_state, key, _fresh_progress(),
                        self.config.to_json())

    def restore(self, like: dict, key: torch.Tensor):
        """``(params, state, opt_state, progress, history)`` of the checkpoint, checked against
        ``like`` and the run's key; the history is cut at the checkpoint's epoch."""
        tree, progress, _ = load_run(self.dir, like=like)
        if not torch.equal(tree["key"], key):
            raise CheckpointError(f"{self.checkpoint}: expected a checkpoint whose key derives from "
                                  f"seed {getattr(self.config, 'seed', 0)}, got another key")
        history = self.history(progress["epoch"])
        if self.writes:   # the data folder or device may have moved, or the epochs grown
            write_json(self.dir / CONFIG, self.config.to_json())
        return tree["params"], tree["state"], tree["opt_state"], progress, history

    def history(self, upto_epoch: int | None = None) -> list[dict]:
        """The rows of ``metrics.jsonl`` (up to and including epoch ``upto_epoch``)."""
        path = self.dir / METRICS
        rows = read_jsonl(path) if path.is_file() else []
        return [r for r in rows if upto_epoch is None or r["epoch"] <= upto_epoch]

    def save(self, params, state, opt_state, key, progress: dict) -> None:
        if self.writes:
            save_checkpoint(self.checkpoint, params, state, opt_state, key, progress,
                            self.config.to_json())

    def end_epoch(self, history: list[dict], params, state, opt_state, key, progress: dict,
                  results: dict, classes: Sequence[str]) -> None:
        """History first, then the checkpoint (a resume drops rows past the checkpoint's
        epoch), then the ``after_epoch`` callbacks."""
        if not self.writes:
            return
        write_jsonl(self.dir / METRICS, history)
        self.save(params, state, opt_state, key, progress)
        for callback in self.after_epoch:
            callback(self, history, results, classes)

    # ---- what the command calls ----------------------------------------------------------
    def guarded(self, train: Callable[[], Any], *, stream=None):
        """``(train(), exit status)``: 0 when it finished or stopped at ``--max-epochs``, 130 when
        interrupted (Ctrl-C or ``kill``: a checkpoint was saved and the resume hint printed), 1
        when the loss became non-finite, 2 when a checkpoint or history cannot be read (each
        reported in one line)."""
        stream = sys.stderr if stream is None else stream
        try:
            with sigterm_as_interrupt():
                result = train()
        except NonFiniteLossError as err:
            print(f"error: {err}", file=stream)
            return None, EXIT_DIVERGED
        except (CheckpointError, DamagedFileError, RunRefused) as err:
            print(f"error: {err}", file=stream)
            return None, EXIT_REFUSED
        status = getattr(result, "status", "done")
        if status == "interrupted":
            if self.writes:
                print(f"interrupted: checkpoint saved in {self.checkpoint}.\n"
                      f"resume with: {self.resume_hint}", file=stream)
            return result, EXIT_INTERRUPTED
        if status == "stopped" and self.writes:
            print(f"stopped; continue with: {self.resume_hint}", file=stream)
        return result, EXIT_OK


def _fresh_progress() -> dict:
    return {"epoch": 0, "step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


def stored_config(run_dir: Path, kind: type[Settings]):
    """``(config, progress)`` stored with ``run_dir``'s checkpoint, as a ``kind``; RunRefused
    (one line) when the folder holds no run, another kind of run, or a config that no longer
    reads (a run written by an older purenn whose settings changed)."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise RunRefused(f"--resume: expected a run folder with a {CHECKPOINT}, got {run_dir}")
    try:
        progress, data = read_checkpoint_meta(path)
        if not data and (run_dir / CONFIG).is_file():
            data = read_json(run_dir / CONFIG)
        return kind.from_json(kind.upgrade(data), where=str(run_dir / CONFIG)), progress
    except (SettingsError, DamagedFileError, CheckpointError) as err:
        raise RunRefused(str(err)) from None


def resumed_config(run_dir: str | Path, kind: type[Settings], given: dict, *,
                   own: dict[str, Any]) -> Settings:
    """What ``--resume run_dir`` asks for: the run's stored config (as a ``kind``) with the
    settings the flags gave laid over it, for :func:`open_run` to continue or refuse.
    RunRefused (one line) when a flag that names a run's own identity (``own``: ``--recipe``,
    ``--name``, ``--out`` with their values, None when not given) was given beside ``--resume``."""
    for name, value in own.items():
        if value is not None:
            raise RunRefused(f"--{name}: expected none with --resume (the run keeps its own), "
                             f"got {value}")
    stored, _ = stored_config(Path(run_dir), kind)
    return stored.replace(**given)


def open_run(run_dir: str | Path, requested: Settings, *, command: str, resume: bool = False,
             rerun_resumes: bool = False, stored: Settings | None = None,
             hint: str | None = None) -> Run:
    """Open ``run_dir`` for the config ``requested`` (module docstring).

    Args:
      requested: the config the command asks for (on ``--resume``: the stored config with the
        flags that were given laid over it).
      command: how the run's command is called (``python -m experiments.sweep``), for hints.
      resume: ``--resume`` was given: the folder must hold a run.
      rerun_resumes: a rerun of the same command continues the run in the folder (the ablation's
        variants), instead of being refused as a run that exists.
      stored: the stored config, when the caller has read it already.
      hint: the command that continues the run, when it is not ``<command> --resume <dir>``
        (a study that continues when rerun).

    Raises:
      RunRefused: one line; nothing was written.
    """
    run_dir = Path(run_dir)
    exists = (run_dir / CHECKPOINT).is_file()
    if not exists:
        if resume:
            raise RunRefused(f"--resume: expected a run folder with a {CHECKPOINT}, got {run_dir}")
        return Run(run_dir, requested, resumed=False, command=command, hint=hint)
    continue_with = hint or f"{command} --resume {run_dir}"
    if not (resume or rerun_resumes):
        raise RunRefused(f"{run_dir} already holds a run; continue it with `{continue_with}` "
                         "or pick another --name")
    if stored is None:
        stored, progress = stored_config(run_dir, type(requested))
    else:
        progress, _ = read_checkpoint_meta(run_dir / CHECKPOINT)
    diffs = stored.differences(requested, ignore=type(stored).resumable)
    why: dict[str, str] = {}
    for d in diffs:
        if d.name == "epochs":
            problem = _epochs_problem(stored, requested, progress.get("epoch", 0))
            if problem is not None:
                why["epochs"] = problem
        else:
            why.setdefault(d.name, "")
    refused = [d for d in diffs if d.name in why]
    if refused:
        instead = ("rerun with the settings it was trained with, or pick another --name"
                   if rerun_resumes and not resume else
                   f"continue it with `{continue_with}` and its settings, or pick another --name")
        raise refuse_differences(run_dir, "a run trained", refused, instead, why)
    return Run(run_dir, requested, resumed=True, command=command, hint=hint)
