"""Batch normalisation over ``(N, C)``, ``(N, C, L)`` and ``(N, C, H, W)``, state passed in and out."""
import torch

from . import _checks as C
from . import parallel
from ._impl import resolve
from ._members import member_batch_norm

STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked")
PARAM_KEYS = ("weight", "bias")
#: Input dtypes torch's batch norm takes against float32 parameters and statistics (mixed
#: precision: computed in float32, returned in the input's dtype).
MIXED_INPUT_DTYPES = (torch.float16, torch.bfloat16)


def _check(params, state, x, train, momentum, eps, where):
    C.check_tensor(x, where)
    C.check_rank(x, (2, 3, 4), where, layout="(N, C), (N, C, L) or (N, C, H, W)")
    C.check_bool(train, where, "train")
    if momentum is not None and not (C.is_real(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{where}: expected momentum to be None or a float in [0, 1], got {momentum!r}")
    if not (C.is_real(eps) and eps > 0.0):
        raise ValueError(f"{where}: expected eps to be a float > 0, got {eps!r}")
    channels = x.shape[1]
    if not isinstance(params, dict) or params:
        C.check_keys(params, PARAM_KEYS, (), where, "params ({} for no affine transform)")
        for k in PARAM_KEYS:
            C.check_vector(params[k], channels, where, k, "one per channel of input", x)
    if not isinstance(state, dict) or state:
        C.check_keys(state, STATE_KEYS, (), where, "state ({} for no running statistics)")
        for k in STATE_KEYS[:2]:
            C.check_vector(state[k], channels, where, k, "one per channel of input", x)
        n = state["num_batches_tracked"]
        if not (C.is_int(n) or (isinstance(n, torch.Tensor) and n.dim() == 0)):
            raise TypeError(f"{where}: expected num_batches_tracked to be an int or a 0-d tensor, "
                            f"got {n!r}")
    dtype = _check_dtypes(params, state, x, where)
    values_per_channel = x.numel() // channels if channels else 0
    uses_batch_stats = train or not state
    if uses_batch_stats and values_per_channel <= 1:
        raise ValueError(f"{where}: expected more than 1 value per channel when using batch "
                         f"statistics (train={train}, running stats {'kept' if state else 'absent'}), "
                         f"got input {C.shape_str(x)}")
    return dtype


def _check_dtypes(params, state, x, where):
    """The dtype the layer computes in: that of the parameters and running statistics, which
    must share one; the input must have it too, or be float16 / bfloat16 against float32 ones."""
    tensors = ([(k, params[k]) for k in PARAM_KEYS if params]
               + [(k, state[k]) for k in STATE_KEYS[:2] if state])
    if not tensors:
        C.check_floating(x, where)
        return x.dtype
    like_name, like = tensors[0]
    C.check_floating(like, where, like_name)
    for name, t in tensors[1:]:
        C.check_dtype(t, like, where, name, f"{like_name}'s")
    if not (x.dtype in MIXED_INPUT_DTYPES and like.dtype == torch.float32):
        C.check_dtype(x, like, where, "input", f"{like_name}'s")
    return like.dtype


def _updated_state(state, batch_mean, batch_var_unbiased, momentum):
    """The running-stat update of ``torch.nn.BatchNorm``: ``r <- (1 - f) r + f * batch``.

    ``f = momentum``, or ``1 / num_batches_tracked`` (after the increment) when momentum is None:
    a cumulative average of every batch seen.
    """
    count = state["num_batches_tracked"] + 1
    mean, var = state["running_mean"], state["running_var"]
    if momentum is not None:
        factor = momentum
    elif isinstance(count, torch.Tensor):
        factor = 1.0 / count.to(mean.dtype)
    else:
        factor = 1.0 / count
    return {
        "running_mean": (1 - factor) * mean + factor * batch_mean.detach().to(mean.dtype),
        "running_var": (1 - factor) * var + factor * batch_var_unbiased.detach().to(var.dtype),
        "num_batches_tracked": count,
    }


def batch_norm(params, state, x, *, train, momentum=0.1, eps=1e-5, impl=None):
    """Normalise each channel by its batch (train) or running (eval) statistics, as torch.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel ``c``, where in training
    ``mean`` and ``var`` are the batch mean and *biased* variance over every axis except ``C``,
    and the running statistics are updated with the *unbiased* variance:

    ``running_mean <- (1 - f) running_mean + f mean``,
    ``running_var <- (1 - f) running_var + f var * n / (n - 1)``, ``n = N * L`` (or ``N * H * W``),

    ``f = momentum`` (the weight of the new batch, torch's convention) or, for ``momentum=None``,
    ``1 / num_batches_tracked``: a plain average of all batches. ``num_batches_tracked`` grows
    by one per training call. In eval the running statistics are used and the state is returned
    unchanged. With ``state == {}`` batch statistics are used in train and eval alike.

    Args:
      params: ``{"weight": (C,), "bias": (C,)}``, or ``{}`` for no affine transform.
      state: ``{"running_mean": (C,), "running_var": (C,), "num_batches_tracked": ()}``, or ``{}``.
      x: ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)``, in the dtype of ``params`` and ``state``
        (which share one), or float16 / bfloat16 against float32 ones: then the layer computes
        in float32 and returns ``y`` in the input's dtype, as ``F.batch_norm``.
      train: use (and update) batch statistics.
      impl: ``"fast"`` (``F.batch_norm``), ``"explicit"`` (the formula) or None (the default).

    Inside :func:`layers.parallel.batch_axis` with an ``all_reduce`` (synchronised batch norm),
    ``x`` is this process's rows and the batch statistics are those of the global batch
    (:func:`_synced`, one formulation for both ``impl``); without ``all_reduce`` they are local.

    Returns:
      ``(y, new_state)``, ``y`` shaped like ``x``. Nothing passed in is modified.
    """
    where = "batch_norm"
    impl = resolve(impl, where)
    dtype = _check(params, state, x, train, momentum, eps, where)
    weight, bias = params.get("weight"), params.get("bias")
    update = train and bool(state)
    axis = parallel.current()
    if axis is not None and axis.all_reduce is not None and (train or not state):
        y, new_state = _synced(weight, bias, state, x.to(dtype), update, momentum, eps, axis)
        return y.to(x.dtype), new_state
    if impl == "fast":
        return _fast(weight, bias, state, x, train, update, momentum, eps)
    y, new_state = _explicit(weight, bias, state, x.to(dtype), train, update, momentum, eps)
    return y.to(x.dtype), new_state


def _fast(weight, bias, state, x, train, update, momentum, eps):
    # member_batch_norm is F.batch_norm writing into copies of the running buffers, which it
    # returns (one batch norm of the members side by side under an ensemble's vmap, _members.py)
    if not train and state:
        y, _, _ = member_batch_norm(x, state["running_mean"], state["running_var"], weight, bias,
                                    False, 0.0, eps)
        return y, state
    if not update:
        return member_batch_norm(x, None, None, weight, bias, True, 0.0, eps)[0], state
    count = state["num_batches_tracked"] + 1
    if momentum is not None:
        y, running_mean, running_var = member_batch_norm(
            x, state["running_mean"], state["running_var"], weight, bias, True, momentum, eps)
        return y, {"running_mean": running_mean, "running_var": running_var,
                   "num_batches_tracked": count}
    # momentum=None weights the batch by 1 / count, a tensor that F.batch_norm cannot take. Give
    # it zero buffers and momentum 1 so they come back holding exactly this batch's mean and
    # unbiased variance, then apply the running update functionally.
    stats = state["running_mean"]
    zeros = torch.zeros(x.shape[1], dtype=stats.dtype, device=stats.device)
    y, batch_mean, batch_var = member_batch_norm(x, zeros, zeros, weight, bias, True, 1.0, eps)
    return y, _updated_state(state, batch_mean, batch_var, momentum)


def _explicit(weight, bias, state, x, train, update, momentum, eps):
    if train or not state:
        y, mean, var = ExplicitBatchNormTrain.apply(x, weight, bias, eps)
    else:
        y = ExplicitBatchNormEval.apply(x, weight, bias, state["running_mean"],
                                        state["running_var"], eps)
    if not update:
        return y, state
    n = x.numel() // x.shape[1]
    return y, _updated_state(state, mean, var * (n / (n - 1)), momentum)


def _synced(weight, bias, state, x, update, momentum, eps, axis):
    """Batch norm over the global batch of a data-parallel axis, differentiable through
    ``axis.all_reduce``.

    With ``n`` values per channel over every process (``n_local * total / rows``: the processes
    hold equal slices), ``mean = all_reduce(sum(x)) / n`` and, in a second pass for the accuracy
    of a centred sum, ``var = all_reduce(sum((x - mean)^2)) / n`` (biased); then
    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` and the running update of
    :func:`_updated_state` with ``var * n / (n - 1)``. Written in autograd ops: the gradient
    reaches every process's ``x`` through the statistics because ``all_reduce``'s backward sums
    the incoming gradients over the processes (as torch's ``SyncBatchNorm``).
    """
    axes, per_channel = _per_channel(x)
    n_local = x.numel() // x.shape[1]
    n = n_local * axis.total // axis.rows
    mean = axis.all_reduce(x.sum(dim=axes)) / n
    centred = x - mean.reshape(per_channel)
    var = axis.all_reduce((centred * centred).sum(dim=axes)) / n
    y = centred * torch.rsqrt(var + eps).reshape(per_channel)
    if weight is not None:
        y = y * weight.reshape(per_channel) + bias.reshape(per_channel)
    if not update:
        return y, state
    return y, _updated_state(state, mean, var * (n / (n - 1)), momentum)


def _per_channel(x):
    """``(axes, shape)``: every axis of ``x`` but the channel axis, and the shape ``(1, C, 1, ...)``
    that broadcasts a ``(C,)`` vector against ``x``."""
    return [0] + list(range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)


class ExplicitBatchNormTrain(torch.autograd.Function):
    """Batch norm with batch statistics (training, or no running statistics), written out, with
    its backward.

    Per channel, over its ``n`` values (every axis but ``C``), ``mu = mean(x)``,
    ``var = mean((x - mu)^2)`` (biased), ``sigma = sqrt(var + eps)``, ``x_hat = (x - mu) / sigma``
    and ``y = gamma x_hat + beta``. The statistics depend on every ``x`` of the channel, so the
    gradient has three paths, ``dx = dx_hat / sigma + dmu / n + dvar * 2 (x - mu) / n`` with
    ``dx_hat = gamma dy``, ``dmu = -sum(dx_hat) / sigma`` (the ``dvar`` term through ``mu``
    vanishes: ``sum(x - mu) = 0``) and ``dvar = -sum(dx_hat x_hat) / (2 sigma^2)``. Collected:

        dx    = (gamma / sigma) / n * (n dy - sum(dy) - x_hat sum(dy x_hat))
        dgamma = sum(dy x_hat),   dbeta = sum(dy)

    (sums over the channel's ``n`` values). ``forward`` returns ``(y, mu, var)``: the running
    statistics are updated from ``mu`` and ``var`` (detached), and they are saved (with ``x`` and
    ``gamma``) so the backward rebuilds ``sigma`` and ``x_hat``. Gradients reaching ``mu`` and
    ``var`` as outputs add ``dmu_out / n + dvar_out * 2 (x - mu) / n``. ``weight`` and ``bias``
    are None for no affine transform (``gamma = 1``, ``beta = 0``).
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        axes, per_channel = _per_channel(x)
        mean = x.mean(dim=axes)
        var = ((x - mean.reshape(per_channel)) ** 2).mean(dim=axes)   # biased: divide by n
        y = (x - mean.reshape(per_channel)) / torch.sqrt(var.reshape(per_channel) + eps)
        if weight is not None:
            y = y * weight.reshape(per_channel) + bias.reshape(per_channel)
        return y, mean, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, mean, var = output
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dy, d_mean, d_var):
        x, weight, mean, var = ctx.saved_tensors
        axes, per_channel = _per_channel(x)
        n = x.numel() // x.shape[1]
        centred = x - mean.reshape(per_channel)
        sigma = torch.sqrt(var + ctx.eps)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = d_weight = d_bias = None
        if dy is not None:                      # None: only mu or var reached the loss
            x_hat = centred / sigma.reshape(per_channel)
            sum_dy = dy.sum(dim=axes)                                  # dbeta
            sum_dy_x_hat = (dy * x_hat).sum(dim=axes)                  # dgamma
            if need_x:
                gain = sigma.reciprocal() if weight is None else weight / sigma    # gamma / sigma
                dx = (gain / n).reshape(per_channel) * (
                    n * dy - sum_dy.reshape(per_channel) - x_hat * sum_dy_x_hat.reshape(per_channel))
            d_weight = sum_dy_x_hat if need_w else None
            d_bias = sum_dy if need_b else None
        if need_x and d_mean is not None:       # mu = sum(x) / n
            dx = _plus(dx, (d_mean / n).reshape(per_channel), x)
        if need_x and d_var is not None:        # var = sum((x - mu)^2) / n; sum(x - mu) = 0
            dx = _plus(dx, (d_var * (2.0 / n)).reshape(per_channel) * centred, x)
        return dx, d_weight, d_bias, None


def _plus(total, term, like):
    """``total + term`` shaped like ``like``, where ``total`` may be None (no term yet)."""
    return term.expand_as(like) if total is None else total + term


class ExplicitBatchNormEval(torch.autograd.Function):
    """Batch norm with given (running) statistics, written out, with its backward.

    ``y = gamma (x - mu) / sigma + beta`` with ``sigma = sqrt(var + eps)``: per channel an affine
    map of ``x`` whose coefficients do not depend on ``x``. With ``x_hat = (x - mu) / sigma``:

        dx = dy gamma / sigma
        dgamma = sum(dy x_hat),   dbeta = sum(dy)
        dmu = -sum(dy) gamma / sigma,   dvar = -sum(dy x_hat) gamma / (2 sigma^2)

    (sums over each channel's values). torch gives no gradient for the running statistics; this
    formulation does, as plain autograd of the formula would. ``weight`` and ``bias`` are None for
    no affine transform.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, mean, var, eps):
        _, per_channel = _per_channel(x)
        y = (x - mean.reshape(per_channel)) / torch.sqrt(var.reshape(per_channel) + eps)
        if weight is not None:
            y = y * weight.reshape(per_channel) + bias.reshape(per_channel)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, mean, var, eps = inputs
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var = ctx.saved_tensors
        axes, per_channel = _per_channel(x)
        sigma = torch.sqrt(var + ctx.eps)
        gain = sigma.reciprocal() if weight is None else weight / sigma            # gamma / sigma
        need_x, need_w, need_b, need_mean, need_var = ctx.needs_input_grad[:5]
        dx = d_weight = d_bias = d_mean = d_var = None
        if need_x:
            dx = dy * gain.reshape(per_channel)
        if need_w or need_var:
            x_hat = (x - mean.reshape(per_channel)) / sigma.reshape(per_channel)
            sum_dy_x_hat = (dy * x_hat).sum(dim=axes)
        if need_b or need_mean:
            sum_dy = dy.sum(dim=axes)
        if need_w:
            d_weight = sum_dy_x_hat
        if need_b:
            d_bias = sum_dy
        if need_mean:
            d_mean = -sum_dy * gain
        if need_var:
            d_var = -sum_dy_x_hat * gain / (2 * sigma)
        return dx, d_weight, d_bias, d_mean, d_var, None
