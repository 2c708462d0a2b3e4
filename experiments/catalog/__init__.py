"""The run catalog: what any run folder holds, and the one loader that rebuilds its net.

    from experiments.catalog import load_trained
    run = load_trained("runs/sweep-lr")          # run.what: "an ensemble of 8 members (a sweep)"

It sits above the study packages (it knows each study's config class, :mod:`.kinds`) and below
the commands that read run folders (``evaluate``, ``inspect``, ``visualize``).
"""
from .kinds import BARE, KINDS, RunKind, kind_of, read_config
from .loader import TrainedRun, Views, WrongRunError, load_trained, feature_layers, shown

__all__ = ["BARE", "KINDS", "RunKind", "kind_of", "read_config", "TrainedRun",
           "Views", "WrongRunError", "load_trained", "feature_layers", "shown"]
