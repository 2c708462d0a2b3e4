"""Model B trained with optax inside one ``jax.jit``, through :func:`nets.jax_apply`.

One training step is one compiled XLA program: ``nets.jax_apply(model_b)`` (the torch layers,
lowered by torchax), optax's label-smoothed cross-entropy, ``jax.value_and_grad`` and the
optimizer of Model B's fast recipe written with optax (L2 weight decay on conv / linear weights,
Nesterov SGD, the one-cycle learning rate). The data are the torch trainer's: the same run keys
(:mod:`experiments.train.keys`), epoch orders and augmentation (done in torch, outside the
program), and the same dropout keys, which the program hashes itself.

Alongside, for the first ``check_steps`` steps, the torch step (``torch.func.grad_and_value`` of
``net.apply`` and ``optim.sgd``) runs on the same batches from the same parameters, in the same
formulation and in the other one: the relative parameter difference after each step says how
far the JAX run is from torch, measured against how far torch's two formulations are from each
other (in float32 both grow quickly: ReLU and max-pool decisions flip). Their step times give the
speed ratio; the compiled step's compile time is reported apart.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import layers
import nets
import optim

from ..cifar.config import RECIPES
from ..common.files import DamagedFileError, read_json
from ..common.settings import SettingsError, choice, number, optional, setting, whole
from ..data.augment import augment_batch, normalize
from ..data.cifar10 import find_data_dir, load_cifar10
from ..data.settings import DataSettings
from ..train.device import retain_freed_memory
from ..train.keys import epoch_order, run_keys, step_keys
from ..train.lifecycle import NonFiniteLossError, RunRefused, refuse_differences

__all__ = ["JaxTrainConfig", "run", "machine", "check_record_path"]

#: Model B's fast recipe: the net's dropouts, the optimizer and the loss the JAX run trains with.
RECIPE = RECIPES["cifar_model_b"]["fast"]


def _data_setting(name: str, default):
    """:class:`DataSettings`' setting ``name`` (its check and help) with another default."""
    f = DataSettings.__dataclass_fields__[name]
    return setting(default, f.metadata["check"], f.metadata["help"])


@dataclass(frozen=True)
class JaxTrainConfig(DataSettings):
    """What :func:`run` trains. ``lr=None`` takes the fast recipe's peak rate scaled linearly
    from its batch of 512 to ``batch_size``; ``limit_per_class=None`` uses the whole split (the
    data settings' check: ``0`` is refused, as by every command)."""

    limit_per_class: int | None = _data_setting("limit_per_class", 256)
    epochs: int = setting(3, whole(1), "training epochs")
    batch_size: int = setting(128, whole(1), "images per step")
    test_limit_per_class: int | None = setting(100, optional(whole(1)), "test on the first N images of each class (none: all)")
    seed: int = setting(0, whole(0), "run key seed: init, order, augmentation, dropout")
    lr: float | None = setting(None, optional(number(0, low_open=True)), "peak learning rate (none: the fast recipe's, scaled to the batch)")
    check_steps: int = setting(5, whole(0), "run the torch step alongside for the first N steps")
    dtype: str = setting("float32", choice("float32", "float64"), "parameter and input dtype")
    impl: str = setting("fast", choice("fast", "explicit"), "layers' formulation")
    eval_batch_size: int = setting(500, whole(1), "images per evaluation batch")

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else RECIPE.lr * self.batch_size / RECIPE.batch_size


def check_record_path(path: str | Path, cfg: JaxTrainConfig) -> None:
    """The run lifecycle of the record file ``--out``: a new file, or a rerun of the same
    settings (a measurement taken again, written when it ends). A file that holds a record of
    other settings is refused (:class:`RunRefused`, one line naming each differing setting;
    ``data_dir`` may differ) and left as it was; so is a file that is no record."""
    path = Path(path)
    if not path.exists():
        return
    try:
        data = read_json(path)
        stored = JaxTrainConfig.from_json(data.get("config") if isinstance(data, dict) else None,
                                          where=f"{path}: config")
    except (DamagedFileError, SettingsError) as err:
        raise RunRefused(f"--out: expected a new file or a jax_train record, got {path} ({err}); "
                         "it is left as it was: pick another --out") from None
    diffs = stored.differences(cfg, ignore=JaxTrainConfig.resumable)
    if diffs:
        raise refuse_differences(path, "a record measured", diffs, "pick another --out")


def machine() -> dict[str, Any]:
    """The CPU model, core count and library versions, for the record."""
    import jax
    import optax
    import torchax
    model = platform.processor() or "unknown"
    try:   # Linux names the CPU here; platform.processor() often says only "x86_64"
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "jax": jax.__version__, "optax": optax.__version__,
            "torchax": torchax.__version__, "python": platform.python_version()}


def _schedule(cfg: JaxTrainConfig, total_steps: int):
    return optim.one_cycle_schedule(cfg.peak_lr(), total_steps, pct_start=RECIPE.pct_start,
                                    div_factor=RECIPE.div_factor,
                                    final_div_factor=RECIPE.final_div_factor)


def _torch_optimizer(cfg, schedule):
    return optim.sgd(schedule, momentum=RECIPE.momentum, nesterov=RECIPE.nesterov,
                     weight_decay=RECIPE.weight_decay,
                     weight_decay_mask=optim.decay_mask_no_bias_or_norm)


def _optax_optimizer(cfg, schedule, total_steps, decay_mask):
    """The same optimizer in optax. The schedule is a table of optim's one-cycle values, looked up
    by optax's count (optax has no OneCycleLR of torch's exact form), in the parameters' dtype as
    torch applies it (a float64 rate would promote float32 updates to float64)."""
    import jax.numpy as jnp
    import optax
    table = jnp.asarray([schedule(t) for t in range(total_steps + 1)], dtype=cfg.dtype)
    return optax.chain(optax.add_decayed_weights(RECIPE.weight_decay, mask=decay_mask),
                       optax.sgd(lambda count: table[count], momentum=RECIPE.momentum,
                                 nesterov=RECIPE.nesterov))


def _torch_step(net, opt, smoothing):
    def loss(params, state, x, y, key):
        logits, new_state = net.apply(params, state, x, train=True, key=key)
        return layers.cross_entropy(logits, y, label_smoothing=smoothing), new_state

    def step(params, state, opt_state, x, y, key):
        grads, (value, new_state) = torch.func.grad_and_value(loss, has_aux=True)(params, state, x, y, key)
        params, opt_state = optim.step(opt, grads, opt_state, params)
        return params, new_state, opt_state, value
    return step


def _jax_step(net, opt, smoothing, num_classes, impl):
    """The compiled step ``(params, state, opt_state, x, y, key) -> (params, state, opt_state,
    loss)``; params, state and opt_state are donated."""
    import jax
    import optax
    apply = nets.jax_apply(net, impl=impl)

    def loss(params, state, x, y, key):
        logits, new_state = apply(params, state, x, train=True, key=key)
        target = optax.smooth_labels(jax.nn.one_hot(y, num_classes, dtype=logits.dtype), smoothing)
        return optax.softmax_cross_entropy(logits, target).mean(), new_state

    def step(params, state, opt_state, x, y, key):
        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params, state, x, y, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, value
    return jax.jit(step, donate_argnums=(0, 1, 2))


def _relative_difference(ours: dict, theirs: dict) -> float:
    """``||ours - theirs|| / ||theirs||`` over all leaves together (2-norms, in float64)."""
    diff = sum(float(((ours[k].double() - theirs[k].double()) ** 2).sum()) for k in theirs)
    size = sum(float((theirs[k].double() ** 2).sum()) for k in theirs)
    return math.sqrt(diff / size) if size else math.sqrt(diff)


def _copy_to_jax(tree):
    """``tree`` as jax arrays with their own memory (DLPack shares torch's, and donating a shared
    buffer would let XLA write into torch's tensors)."""
    import jax
    import jax.numpy as jnp
    return jax.tree_util.tree_map(jnp.copy, nets.to_jax(tree))


def _copy_to_torch(tree):
    """``tree`` as torch tensors with their own memory (the jax buffers are donated next step)."""
    return {k: v.clone() for k, v in nets.from_jax(tree).items()}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: JaxTrainConfig) -> dict[str, Any]:
    """Train and return the record: config, machine, compile time, per-step times of both steps,
    the first steps' differences, per-epoch loss and test accuracy.

    Raises (one line each, before jax is imported): DataNotFoundError for a missing data
    folder, SettingsError for a batch larger than the training images; NonFiniteLossError
    when the loss becomes NaN or infinite.
    """
    root = find_data_dir(cfg.data_dir)
    train = load_cifar10(root, "train", limit_per_class=cfg.limit_per_class)
    test = load_cifar10(root, "test", limit_per_class=cfg.test_limit_per_class)
    steps_per_epoch = len(train.labels) // cfg.batch_size    # the last partial batch is dropped:
    if steps_per_epoch == 0:                                 # one static shape, one compilation
        raise SettingsError(f"--batch-size: expected at most {len(train.labels)} (the training "
                            f"images), got {cfg.batch_size}")
    import jax
    jax.config.update("jax_enable_x64", True)     # keys and step counts are int64
    # As the torch trainer does (docs/performance.md): no page faults for freed and re-allocated
    # step buffers, which the torch step would otherwise pay and XLA's own allocator does not.
    retain_freed_memory()
    dtype = getattr(torch, cfg.dtype)
    total_steps = cfg.epochs * steps_per_epoch
    keys = run_keys(cfg.seed)
    net = nets.model_b(num_classes=len(train.classes), dropout=RECIPE.dropout,
                       head_dropout=RECIPE.head_dropout)
    params, state = net.init(keys.init, dtype=dtype)
    schedule = _schedule(cfg, total_steps)
    smoothing = RECIPE.label_smoothing

    opt = _optax_optimizer(cfg, schedule, total_steps, optim.decay_mask_no_bias_or_norm(params))
    j_params, j_state = _copy_to_jax(params), _copy_to_jax(state)
    j_opt_state = opt.init(j_params)
    step = _jax_step(net, opt, smoothing, len(train.classes), cfg.impl)

    # The torch step in the same formulation, and in the other one: how far torch's own two
    # formulations drift apart is the yardstick for how far the JAX run drifts from torch.
    check = min(cfg.check_steps, total_steps)
    other = "explicit" if cfg.impl == "fast" else "fast"
    t_opt = _torch_optimizer(cfg, schedule)
    t_step = _torch_step(net, t_opt, smoothing)
    torch_runs = {impl: (params, state, t_opt.init(params)) for impl in (cfg.impl, other)}

    record: dict[str, Any] = {"config": cfg.to_json(), "machine": machine(),
                              "train_images": len(train.labels), "test_images": len(test.labels),
                              "steps_per_epoch": steps_per_epoch, "peak_lr": cfg.peak_lr(),
                              "check": [], "epochs": []}
    jax_times, torch_times, compile_s = [], [], None
    for epoch in range(cfg.epochs):
        order = epoch_order(keys.train, epoch, len(train.labels))
        losses, started = [], time.perf_counter()
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            sk = step_keys(keys.train, epoch, s)
            x = augment_batch(sk.augment, train.images[idx], dtype=dtype)
            y = train.labels[idx]
            args = nets.to_jax((x, y, sk.dropout))
            if compile_s is None:
                t0 = time.perf_counter()
                step = step.lower(j_params, j_state, j_opt_state, *args).compile()
                compile_s = time.perf_counter() - t0
                _log(f"jax_train: step compiled in {compile_s:.1f} s")
            t0 = time.perf_counter()
            j_params, j_state, j_opt_state, value = step(j_params, j_state, j_opt_state, *args)
            value = float(value)                     # waits for the step
            jax_times.append(time.perf_counter() - t0)
            losses.append(value)
            done = epoch * steps_per_epoch + s
            if done < check:
                for impl in (cfg.impl, other):
                    t0 = time.perf_counter()
                    with layers.default_impl(impl):
                        *torch_runs[impl], t_value = t_step(*torch_runs[impl], x, y, sk.dropout)
                    if impl == cfg.impl:
                        torch_times.append(time.perf_counter() - t0)
                        t_loss = float(t_value)
                (t_params, t_state, _), (o_params, _, _) = torch_runs[cfg.impl], torch_runs[other]
                row = {"step": done + 1, "loss_jax": value, "loss_torch": t_loss,
                       "params_rel_diff": _relative_difference(_copy_to_torch(j_params), t_params),
                       "state_rel_diff": _relative_difference(_copy_to_torch(j_state), t_state),
                       "params_rel_diff_torch_formulations": _relative_difference(o_params, t_params)}
                record["check"].append(row)
                _log(f"jax_train: step {done + 1}: loss jax {value:.6f} torch {t_loss:.6f}; params "
                     f"differ by {row['params_rel_diff']:.2e} (torch {other} vs {cfg.impl}: "
                     f"{row['params_rel_diff_torch_formulations']:.2e}), state by {row['state_rel_diff']:.2e}")
            if not math.isfinite(value):
                raise NonFiniteLossError(f"jax_train: expected a finite training loss, got {value} at epoch "
                                         f"{epoch + 1}, step {s + 1}; nothing was written (lower --lr)")
        seconds = time.perf_counter() - started
        accuracy = evaluate(net, j_params, j_state, test, cfg, dtype)
        row = {"epoch": epoch + 1, "train_loss": statistics.fmean(losses), "test_accuracy": accuracy,
               "seconds": seconds}
        record["epochs"].append(row)
        _log(f"jax_train: epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, "
             f"test accuracy {accuracy:.4f}, {seconds:.0f} s")
    record["compile_s"] = compile_s
    record["jax_step_s"] = statistics.median(jax_times[1:] or jax_times)
    record["jax_images_per_s"] = cfg.batch_size / record["jax_step_s"]
    if len(torch_times) > 1:                         # the first torch step pays its allocations
        record["torch_step_s"] = statistics.median(torch_times[1:])
        record["torch_images_per_s"] = cfg.batch_size / record["torch_step_s"]
    return record


def evaluate(net, params, state, test, cfg: JaxTrainConfig, dtype) -> float:
    """Test accuracy with the compiled eval apply, in batches of ``eval_batch_size`` (the last
    one padded, so there is one shape: eval batch norm treats every image on its own)."""
    import jax
    import jax.numpy as jnp
    apply = jax.jit(nets.jax_apply(net, impl=cfg.impl), static_argnames="train")
    correct, n, b = 0, len(test.labels), cfg.eval_batch_size
    for start in range(0, n, b):
        images = test.images[start:start + b]
        m = len(images)
        if m < b:
            images = torch.cat([images, images.new_zeros((b - m,) + images.shape[1:])])
        logits, _ = apply(params, state, nets.to_jax(normalize(images, dtype=dtype)), train=False)
        predicted = np.array(jnp.argmax(logits[:m], axis=1))
        correct += int((torch.from_numpy(predicted) == test.labels[start:start + m]).sum())
    return correct / n
