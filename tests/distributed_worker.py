"""A torchrun worker for tests/test_distributed.py: ``python -m experiments.cifar_model_a [flags]``
whose rank 1 kills itself (SIGKILL) at epoch 2, step 1 of the first attempt, so that
``torchrun --max-restarts 1`` restarts both ranks and the command resumes the run."""
import os
import signal
import sys

from experiments.cifar import cli
from experiments.train import distributed


def _killer(epoch, step):
    if epoch == 1 and step == 1 and os.environ["RANK"] == "1" and distributed.restart_count() == 0:
        print("killing rank 1 at epoch 2, step 1", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _fit_with_killer(*args, **kwargs):
    return fit(*args, on_step=_killer, **kwargs)


fit = cli.fit
cli.fit = _fit_with_killer

if __name__ == "__main__":
    sys.exit(cli.main("cifar_model_a", "A", sys.argv[1:]))
