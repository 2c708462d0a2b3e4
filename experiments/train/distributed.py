"""Data-parallel training on ``torch.distributed``: N processes train the model one process
trains with the same global batch (docs/distributed.md).

    torchrun --standalone --nproc_per_node 2 -m experiments.cifar_model_b [flags]

:func:`start` reads the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group (gloo on the
CPU, NCCL on CUDA, or the backend asked for); without that environment it returns None and
:func:`~experiments.train.loop.fit` runs as it always did. The :class:`DataParallel` it returns
is what ``fit`` consults:

* every rank walks the same global permutation and takes rows ``rank * b .. (rank + 1) * b - 1``
  of each global batch of ``B = world * b`` (:meth:`DataParallel.local`);
* the step runs inside :meth:`DataParallel.scope`, a :class:`layers.parallel.BatchAxis`: dropout
  and augmentation draw for each row what the one-process run draws for it, and with
  ``sync_bn`` batch norm takes the global batch's statistics through :func:`all_reduce_sum`;
* between backward and update, :meth:`DataParallel.reduce` averages the gradients (and sums the
  metrics) in ONE ``all_reduce`` of one flat bucket;
* after each epoch :meth:`DataParallel.epoch_end` averages the local running statistics
  (without ``sync_bn``) and checks by a hash that every rank holds the same parameters;
* only rank 0 writes (:attr:`DataParallel.writes`).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from layers.parallel import BatchAxis, batch_axis

from .device import resolve_device

__all__ = ["BACKENDS", "DataParallel", "StartError", "RanksDisagreeError", "all_reduce_sum",
           "check_world", "launched", "restart_count", "start", "stop", "tree_hash"]

BACKENDS = ("gloo", "nccl")
#: Seconds a rank waits for the others to join (and, later, for any one collective).
DEFAULT_TIMEOUT_S = 300


class StartError(RuntimeError):
    """The process group could not be formed: a rank failed to start or cannot reach the others."""


class RanksDisagreeError(RuntimeError):
    """Ranks that should hold identical parameters do not."""


class AllReduceSum(torch.autograd.Function):
    """``y = sum over the processes of x``, differentiable: ``dx = sum over the processes of dy``.

    The rule of ``torch.distributed.nn.functional.all_reduce`` (SUM), written with
    ``setup_context`` so that ``torch.func.grad`` accepts it: torch's own ``_AllReduce`` (and
    ``_functional_collectives.all_reduce``) have no ``setup_context`` and torch.func refuses
    them (torch 2.14). The transport is ``torch.distributed.all_reduce`` itself.
    """

    @staticmethod
    def forward(x):
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, dy):
        # Each process's loss depends on every x through the sum, so x's gradient is the sum of
        # the gradients every process sends back: the same collective, applied to dy.
        return AllReduceSum.apply(dy)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the processes of the default group (:class:`AllReduceSum`)."""
    return AllReduceSum.apply(x)


def launched(env: Mapping[str, str] | None = None) -> bool:
    """True when ``torchrun`` (or any launcher setting ``RANK`` and ``WORLD_SIZE``) started us."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def launched_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher set it (0 outside torchrun): who prints before the
    process group exists."""
    env = os.environ if env is None else env
    return int(env.get("RANK", "0")) if launched(env) else 0


def check_launched_world(batch_size: int, env: Mapping[str, str] | None = None) -> None:
    """Under torchrun, refuse (ValueError, one line) a batch the world size does not divide,
    before anything starts; nothing outside torchrun."""
    env = os.environ if env is None else env
    if launched(env):
        check_world(batch_size, int(env["WORLD_SIZE"]))


def batch_norm_note(config, parallel: "DataParallel") -> str:
    """How batch norm normalises when a run resumes on ``parallel.world`` processes: one line
    (docs/distributed.md, "Resuming on another number of processes")."""
    if getattr(config, "sync_bn", False):
        return (f"resuming on {parallel.world} processes with --sync-bn: batch norm normalises "
                f"over the global batch of {config.batch_size}, as one process does")
    return (f"resuming on {parallel.world} processes: batch norm normalises each process's "
            f"{config.batch_size // parallel.world} images (per-process statistics, as torch's "
            f"DDP), not the global batch of {config.batch_size}; pass --sync-bn to normalise over "
            "the global batch")


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How many times ``torchrun --max-restarts`` has restarted the workers (0: first attempt)."""
    env = os.environ if env is None else env
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def check_world(batch_size: int, world: int) -> None:
    """Refuse (ValueError, one line) a world size that does not divide the global batch."""
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size}: expected a multiple of the {world} processes "
                         f"(WORLD_SIZE={world}), each taking an equal slice of the global batch; "
                         f"got {batch_size} = {batch_size // world} x {world} + {batch_size % world}")


def tree_hash(tree) -> int:
    """A 63-bit hash of every leaf's bytes (and shape and dtype), in tree order."""
    h = hashlib.blake2b(digest_size=8)
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(leaf).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def _flat(leaves: list[torch.Tensor], where: str) -> torch.Tensor:
    """The leaves as one flat tensor of their shared dtype (the one bucket of a collective)."""
    dtypes = {t.dtype for t in leaves}
    if len(dtypes) != 1:
        raise TypeError(f"{where}: expected tensors of one floating dtype, got {sorted(map(str, dtypes))}")
    return torch.cat([t.reshape(-1) for t in leaves])


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in like]), like)]


@dataclass
class DataParallel:
    """This process's place in the group and the collectives :func:`~experiments.train.fit` calls.

    ``check_every`` > 0 also checks the parameters' agreement every that many steps (tests).
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    sync_bn: bool = False
    check_every: int = 0

    @property
    def writes(self) -> bool:
        """Only rank 0 writes the run folder (checkpoint, config, metrics, plots)."""
        return self.rank == 0

    def check_fit(self, config: Mapping, drop_last: bool) -> None:
        """Refuse (ValueError, one line) what data parallelism does not run."""
        check_world(config.batch_size, self.world)
        if getattr(config, "seeds", None):
            raise ValueError("distributed: expected one model, got an ensemble (seeds)")
        if config.telemetry:
            raise ValueError("distributed: expected no --telemetry (its probe pass runs on one "
                             "process), got --telemetry")
        if config.compile:
            raise ValueError("distributed: expected no --compile (the collectives in the step "
                             "are not traced), got --compile")
        if not drop_last:
            raise ValueError("distributed: expected drop_last=True (every global batch full, so "
                             "it splits evenly), got drop_last=False")

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch's indices ``(B,)``: rows ``rank * b .. + b``."""
        b = idx.shape[-1] // self.world
        return idx[..., self.rank * b:(self.rank + 1) * b]

    def scope(self, batch_size: int):
        """The batch axis the step runs in (:func:`layers.parallel.batch_axis`)."""
        b = batch_size // self.world
        return batch_axis(BatchAxis(self.rank * b, b, batch_size,
                                    all_reduce_sum if self.sync_bn else None))

    def reduce(self, grads, metrics):
        """``(mean of grads, global metrics)`` over the ranks, in ONE all_reduce.

        The bucket is every gradient flattened, then the local mean loss and correct count;
        after the SUM the gradients and the loss are divided by the world size (each rank's
        loss is the mean over an equal slice, so their mean is the global batch's mean loss
        and its gradient the 1-process gradient). All ranks receive the same bits.
        """
        leaves, spec = pytree.tree_flatten(grads)
        flat = _flat(leaves, "distributed.reduce")
        extra = torch.stack([metrics["loss"].to(flat.dtype), metrics["correct"].to(flat.dtype)])
        bucket = torch.cat([flat, extra])
        dist.all_reduce(bucket)
        n = flat.numel()
        mean = bucket[:n].div_(self.world)
        loss = bucket[n] / self.world
        correct = bucket[n + 1].round().to(metrics["correct"].dtype)
        return pytree.tree_unflatten(_unflat(mean, leaves), spec), {"loss": loss, "correct": correct}

    def average_state(self, state):
        """The floating leaves of ``state`` (running statistics) averaged over the ranks, in one
        all_reduce; integer leaves (``num_batches_tracked``, equal everywhere) as they are."""
        leaves, spec = pytree.tree_flatten(state)
        floating = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not floating:
            return state
        bucket = _flat(floating, "distributed.average_state")
        dist.all_reduce(bucket)
        averaged = iter(_unflat(bucket.div_(self.world), floating))
        return pytree.tree_unflatten(
            [next(averaged) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
             for t in leaves], spec)

    def check_agreement(self, tree, where: str) -> None:
        """Raise :class:`RanksDisagreeError` unless every rank's ``tree`` has the same hash."""
        mine = torch.tensor([tree_hash(tree)], dtype=torch.int64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        hashes = [int(h) for h in every]
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if differ:
            raise RanksDisagreeError(
                f"distributed: expected every rank to hold rank 0's parameters {where}, got "
                f"different hashes on ranks {differ} ({', '.join(f'{h:016x}' for h in hashes)})")

    def after_step(self, params, opt_state, epoch: int, step: int) -> None:
        """Every ``check_every`` steps, :meth:`check_agreement` of parameters and optimizer state."""
        if self.check_every and step % self.check_every == 0:
            self.check_agreement((params, opt_state), f"after epoch {epoch + 1}, step {step}")

    def epoch_end(self, params, state, opt_state, epoch: int):
        """The state to carry on with after epoch ``epoch`` (0-based): local running statistics
        averaged over the ranks (with ``sync_bn`` they are already the global batch's and stay
        as they are); then every rank's parameters, state and optimizer state are checked to agree."""
        if not self.sync_bn:
            state = self.average_state(state)
        self.check_agreement((params, state, opt_state), f"after epoch {epoch + 1}")
        return state

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` on every rank (a barrier too)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


def start(config: Mapping, *, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
          env: Mapping[str, str] | None = None) -> DataParallel | None:
    """Join the process group ``torchrun`` set up, or return None when not launched by it.

    The world size is checked against ``config["batch_size"]`` first (ValueError, one line,
    nothing started). A CUDA run uses ``cuda:LOCAL_RANK`` and NCCL, a CPU run gloo and, unless
    ``OMP_NUM_THREADS`` is set (torchrun sets it to 1 for several processes per machine), the
    machine's cores shared among its ranks. Raises :class:`StartError` (one line) when the group
    cannot form within ``timeout_s``.
    """
    env = os.environ if env is None else env
    if not launched(env):
        return None
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    check_world(config.batch_size, world)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"--dist-backend: expected one of {BACKENDS}, got {backend!r}")
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in env:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend, store=_store(env, rank, world, timeout), rank=rank,
                                world_size=world, timeout=timeout)
    except Exception as err:   # the store's and the backends' errors have no common base
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise StartError(f"distributed: rank {rank} of {world} could not form the {backend} process "
                         f"group at {where} within {timeout_s:g} s: a rank failed to start or "
                         f"cannot reach it ({type(err).__name__}: {first})") from None
    return DataParallel(rank, world, local_rank, device, sync_bn=bool(getattr(config, "sync_bn", False)))


def _store(env: Mapping[str, str], rank: int, world: int, timeout: datetime.timedelta):
    """The store the ranks meet in, its keys under the attempt's own prefix.

    Under torchrun the agent hosts it (``TORCHELASTIC_USE_AGENT_STORE``), and the same store
    serves every attempt of ``--max-restarts``: the keys where a process group publishes each
    rank's address outlive the attempt that wrote them, and a restarted rank 1 read the dead
    rank 0's address there (gloo: "connectFullMesh failed ... Connection refused"; torch 2.14,
    seen here 1 restart in 2). The prefix ``attempt-<TORCHELASTIC_RESTART_COUNT>`` gives each
    attempt its own keys. Without the agent, rank 0 hosts the store as ``env://`` does.
    """
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise ValueError("expected MASTER_ADDR and MASTER_PORT in the environment (torchrun sets them)")
    hosted_by_agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                          is_master=rank == 0 and not hosted_by_agent, timeout=timeout)
    return dist.PrefixStore(f"purenn/attempt-{restart_count(env)}", store)


def stop(parallel: DataParallel | None) -> None:
    """Leave the process group (nothing for a one-process run)."""
    if parallel is not None and dist.is_initialized():
        dist.destroy_process_group()


def exit_now(parallel: DataParallel | None, code: int) -> int:
    """``code`` for a one-process run; under torchrun, leave the process at once with ``code``.

    With gloo, a rank's interpreter teardown sometimes aborts ("terminate called without an
    active exception": a C++ thread of the distributed runtime still joinable when its owner is
    destroyed), after all its work is done; torchrun then counts the rank as failed and restarts
    or fails the job (tests/test_distributed.py's restart test hit it about 1 run in 4). So a
    rank that has finished and left the process group flushes its output and ends with
    ``os._exit``, skipping that teardown. Everything it writes is written and closed by then
    (checkpoints and metrics are written atomically and closed before ``fit`` returns)."""
    if parallel is None:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
