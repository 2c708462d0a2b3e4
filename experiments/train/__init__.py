"""The trainer: the pure step, evaluation, the run keys, the run folder and the one loop.

    from experiments.train import fit, make_step, make_eval, evaluate, run_keys

See docs/training.md and docs/architecture.md.
"""
from .device import resolve_device, retain_freed_memory
from .ensemble import MAX_MEMBERS, ensemble_parts, member_losses
from .keys import RunKeys, StepKeys, epoch_order, run_keys, step_keys
from .lifecycle import Run, RunRefused, open_run, run_folder
from .loop import FitResult, NonFiniteLossError, fit, fit_tensors, sigterm_as_interrupt
from .metrics import EvalResult, Scores, evaluate, logits_in_batches, predict_all, score_net, scores
from ..common.progress import ProgressBar, history_table
from .registry import NET_BUILDERS, build_net, num_classes_of
from .runs import CHECKPOINT, NonFiniteCheckpointError, checkpoint_path, load_run
from .step import make_eval, make_step, to_channels_last, translate, tta_views

__all__ = [
    "resolve_device", "retain_freed_memory", "RunKeys", "StepKeys", "epoch_order", "run_keys",
    "step_keys", "Run", "RunRefused", "open_run", "run_folder", "FitResult", "NonFiniteLossError", "fit", "fit_tensors", "sigterm_as_interrupt", "EvalResult",
    "Scores", "evaluate", "logits_in_batches", "predict_all", "score_net", "scores", "ProgressBar",
    "history_table", "CHECKPOINT", "NET_BUILDERS", "NonFiniteCheckpointError", "build_net",
    "checkpoint_path", "load_run", "num_classes_of", "make_eval", "make_step", "to_channels_last",
    "translate", "tta_views", "MAX_MEMBERS", "ensemble_parts", "member_losses",
]
