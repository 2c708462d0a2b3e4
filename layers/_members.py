"""Convolution, max pooling and batch norm over ensemble members: one operation over the members
side by side under ``torch.func.vmap``.

When ``vmap`` maps a convolution whose input *and* weight both carry the member dimension
(K members of ``nets.ensemble``, each with its own activations and filters), torch's batching
rule folds the members into channel groups of an NCHW convolution:

    y = conv2d(x (N, K*C, H, W), w (K*O, C, kh, kw), groups=K)      -> (N, K*O, Ho, Wo)

On CPU (oneDNN) that NCHW grouped convolution runs 20-30% slower than the K convolutions it
stands for. :func:`member_conv2d` runs the same grouped convolution on a channels-last input
(each pixel's K*C values side by side), which oneDNN runs about twice as fast as the K
convolutions, forward and backward (docs/performance.md, "Ensembles": 1.6-2.0x for the tutorial
net's second convolution at K = 8, 1.9x for Model A's 64- and 128-channel ones), and hands the
output back as a view ``(N, K, O, Ho, Wo)`` whose member dimension is 1, so nothing is stacked.
Autograd (outside the ``vmap``, as in the trainer's ``grad(vmap(net))``) differentiates that one
convolution. Each member's output is a function of its own input and filters only (the groups
do not mix), so a member's values never enter another's arithmetic; the sums inside a group may
run in another order than a single convolution's (float64: ~1e-16 relative).

Outside ``vmap``, or with an unbatched input (the ensemble's shared first batch: one convolution
with K*O output channels) or an unbatched weight (per-sample gradients), torch's own rule is the
fast one and :func:`member_conv2d` is ``F.conv2d``. An input that is not a batch of images
(``(C, H, W)`` per member) runs one convolution per member (:func:`_member_loop`).

Max pooling between such convolutions has the same problem the other way round: torch's rule
moves the member dimension to the front and pools ``(K*N, C, H, W)`` in NCHW, a copy of the
channels-last convolution output and a kernel that runs over a few channels at a time.
:func:`member_max_pool2d` pools the ``(N, K*C, H, W)`` channels-last view itself (each pixel's
K*C values side by side) and hands back ``(N, K, C, Ho, Wo)`` as a view: on a member
convolution's channels-last output 4.6-29x faster forward and backward than torch's rule for the
tutorial net's pool shapes at K = 2 to 16 (docs/performance.md, "Ensembles"). A
max picks one of its window's values, so the result is bit-identical to pooling each member
alone, ties included (the first maximum in window order, as torch's kernels).

Batch norm likewise: torch's rule normalises without the affine transform, then scales and
shifts a permuted copy (two more passes, and their backward). :func:`member_batch_norm` runs one
``native_batch_norm`` over the ``(N, K*C, ...)`` view with the members' weights, biases and
running statistics side by side: each channel's statistics are over one member's (N, H, W)
values, as in its own batch norm (float64: ~1e-16 relative, another order of summation). It
returns the running statistics instead of writing into them (the functional layer's contract).
"""
import torch
import torch.nn.functional as F

__all__ = ["member_conv2d", "member_max_pool2d", "member_batch_norm", "is_batched"]


def is_batched(t) -> bool:
    """True when ``t`` carries a ``vmap`` dimension at the innermost transform level.

    ``torch._C._functorch.is_batchedtensor`` is the test torch's own vmap code uses; it is False
    for plain tensors and for tensors of an inner ``grad`` (``vmap(grad(f))``), where torch's rule
    applies. Under ``torch.compile`` it is False: dynamo cannot trace the introspection, and the
    compiled graph is one program anyway (torch's rule, which inductor lowers and fuses)."""
    if torch.compiler.is_compiling():
        return False
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t)


class _MemberConv2d(torch.autograd.Function):
    """``F.conv2d`` with a member-grouped vmap rule (module docstring). Its own forward and backward
    only run where it is called outside ``vmap``, which :func:`member_conv2d` never does; they
    are ``F.conv2d`` and ``aten.convolution_backward`` all the same."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
            False, [0, 0], groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias])
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, stride, padding, dilation, groups):
        members = info.batch_size
        x_dim, w_dim, b_dim = in_dims[:3]
        if x_dim is None or w_dim is None or x.dim() != 5:
            return _member_loop(members, in_dims, x, weight, bias, stride, padding, dilation, groups)
        # Members side by side as channel groups, channels-last: (N, K*C, H, W) with each
        # pixel's K*C values contiguous. oneDNN runs this one grouped convolution about twice as
        # fast as the K convolutions (forward and backward), where the same grouped convolution
        # in NCHW is slower than the K (docs/performance.md, "Ensembles").
        x = x.movedim(x_dim, 1)
        n, _, c, h, w = x.shape
        x = x.reshape(n, members * c, h, w).contiguous(memory_format=torch.channels_last)
        weight = weight.movedim(w_dim, 0)
        weight = weight.reshape(members * weight.shape[1], *weight.shape[2:])
        if bias is not None:
            bias = bias.movedim(b_dim, 0).reshape(-1) if b_dim is not None else bias.repeat(members)
        # Under vmap torch's own rule runs outside autocast (a vmapped convolution stays in its
        # inputs' dtype); so does this one, or its bfloat16 outputs would meet float32
        # batch-norm statistics that torch's batch-norm rule cannot mix.
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(x, weight, bias, stride, padding, dilation, groups * members)
        # (N, K*O, Ho, Wo) -> (N, K, O, Ho, Wo), a view whose member dimension is 1
        return y.unflatten(1, (members, -1)), 1


def _member_loop(members, in_dims, x, weight, bias, stride, padding, dilation, groups):
    """One ``F.conv2d`` per member, stacked: the rule for what the grouped form does not take."""
    def split(t, dim):
        if t is None:
            return [None] * members
        return t.movedim(dim, 0).unbind(0) if dim is not None else [t] * members

    xs, ws, bs = (split(t, d) for t, d in zip((x, weight, bias), in_dims[:3]))
    with torch.autocast(x.device.type, enabled=False):
        ys = [F.conv2d(xk, wk, bk, stride, padding, dilation, groups)
              for xk, wk, bk in zip(xs, ws, bs)]
    return torch.stack(ys), 0


def member_conv2d(x, weight, bias, stride, padding, dilation, groups):
    """``F.conv2d(x, weight, bias, ...)``, as one channels-last convolution grouped by ensemble
    member when ``x`` and ``weight`` are both batched by ``vmap`` (module docstring)."""
    if is_batched(x) and is_batched(weight):
        return _MemberConv2d.apply(x, weight, bias, stride, padding, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class _MemberMaxPool2d(torch.autograd.Function):
    """``F.max_pool2d`` with a member-grouped vmap rule (module docstring). Its own forward and
    backward only run where it is called outside ``vmap``, which :func:`member_max_pool2d`
    never does; they are ``aten.max_pool2d_with_indices`` and its backward all the same. The
    indices are a second, non-differentiable output so that ``setup_context`` can save them."""

    @staticmethod
    def forward(x, kernel_size, stride, padding, dilation, ceil_mode):
        return torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, *conf = inputs
        ctx.save_for_backward(x, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.conf = conf

    @staticmethod
    def backward(ctx, grad, _):
        x, indices = ctx.saved_tensors
        gx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *ctx.conf, indices)
        return gx, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, kernel_size, stride, padding, dilation, ceil_mode):
        members, x_dim = info.batch_size, in_dims[0]
        conf = (kernel_size, stride, padding, dilation, ceil_mode)
        if x.dim() != 5:   # (K, C, H, W): each member pools one image, the members are its batch
            y, i = torch.ops.aten.max_pool2d_with_indices(x.movedim(x_dim, 0), *conf)
            return (y, i), (0, 0)
        # (N, K*C, H, W): a view in the layout the members' values already have (channels-last
        # after a member convolution, NCHW after the shared first one); pooling takes either
        x = x.movedim(x_dim, 1)
        n, _, c, h, w = x.shape
        x = x.reshape(n, members * c, h, w)
        y, i = torch.ops.aten.max_pool2d_with_indices(x, *conf)
        return (y.unflatten(1, (members, c)), i.unflatten(1, (members, c))), (1, 1)


def member_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode):
    """``F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)`` (pairs), as one
    channels-last pooling of the members side by side when ``x`` is batched by ``vmap`` (module
    docstring)."""
    if is_batched(x):
        return _MemberMaxPool2d.apply(x, kernel_size, stride, padding, dilation, ceil_mode)[0]
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def _copies(training, *stats):
    """The running statistics a batch norm may write into: copies where it trains (it updates
    them in place), the tensors themselves in eval (only read)."""
    if not training:
        return stats
    return tuple(None if t is None else t.clone() for t in stats)


class _MemberBatchNorm(torch.autograd.Function):
    """``F.batch_norm`` on copies of the running statistics, returned, with a member-grouped
    vmap rule (module docstring). Its own forward and backward only run where it is called
    outside ``vmap``, which :func:`member_batch_norm` never does; they are
    ``aten.native_batch_norm`` and its backward all the same. Outputs ``(y, running_mean,
    running_var, save_mean, save_invstd)``, all but ``y`` non-differentiable (the last two are
    what the backward needs, returned so that ``setup_context`` can save them)."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
        running_mean, running_var = _copies(training, running_mean, running_var)
        y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps)
        if not training:   # the buffers themselves (given: evaluation needs them), as views: a
            # Function cannot return an input
            running_mean, running_var = running_mean.view_as(running_mean), running_var.view_as(running_var)
        return y, running_mean, running_var, save_mean, save_invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, running_mean, running_var, training, _, eps = inputs
        _, new_mean, new_var, save_mean, save_invstd = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        ctx.save_for_backward(x, weight, running_mean, running_var, save_mean, save_invstd)
        ctx.conf = (training, eps)

    @staticmethod
    def backward(ctx, grad, *_):
        x, weight, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        training, eps = ctx.conf
        mask = list(ctx.needs_input_grad[:3])   # False for an absent weight and bias
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps, mask)
        return gx, gw, gb, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, running_mean, running_var, training, momentum, eps):
        # (N, K*C, ...): the members' channels side by side, a view in the layout the values
        # have (channels-last after a member convolution); each channel's statistics are one
        # member's, over the same (N, H, W) values as the member's own batch norm
        members = info.batch_size
        x = x.movedim(in_dims[0], 1)
        n, _, c = x.shape[:3]
        x = x.reshape(n, members * c, *x.shape[3:])

        def side_by_side(t, dim):
            if t is None:
                return None
            return t.movedim(dim, 0).reshape(-1) if dim is not None else t.repeat(members)
        weight, bias, running_mean, running_var = (
            side_by_side(t, d) for t, d in zip((weight, bias, running_mean, running_var), in_dims[1:]))
        running_mean, running_var = _copies(training, running_mean, running_var)
        y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps)

        def per_member(t):   # None, or eval's empty save_mean / save_invstd: not per member
            return (t, None) if t is None or t.numel() == 0 else (t.view(members, c), 0)
        outs = [per_member(t) for t in (running_mean, running_var, save_mean, save_invstd)]
        return ((y.unflatten(1, (members, c)), *(t for t, _ in outs)), (1, *(d for _, d in outs)))


def member_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """``F.batch_norm(x, ...)`` without writing into the running statistics:
    ``(y, new_running_mean, new_running_var)`` (copies, updated where ``training``; None where
    none were given). Under ``vmap`` with ``x`` batched it is one batch norm of the members'
    channels side by side (module docstring); a statistic or affine parameter given unbatched is
    every member's (so unbatched running buffers come back one per member, where torch's rule
    refuses to update them in place). Otherwise ``F.batch_norm`` on copies. Evaluation without
    running statistics is refused, as ``F.batch_norm`` refuses it."""
    if not training and (running_mean is None or running_var is None):
        # F.batch_norm refuses this too; aten.native_batch_norm, which the rule calls, would crash
        raise ValueError("member_batch_norm: expected running_mean and running_var in evaluation "
                         f"mode (training=False), got {type(running_mean).__name__} and "
                         f"{type(running_var).__name__}")
    if is_batched(x) and x.dim() >= 2 and (running_mean is None) == (running_var is None):
        y, new_mean, new_var, _, _ = _MemberBatchNorm.apply(
            x, weight, bias, running_mean, running_var, training, momentum, eps)
        return y, new_mean, new_var
    running_mean, running_var = _copies(training, running_mean, running_var)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return y, running_mean, running_var
