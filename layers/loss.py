"""Cross-entropy loss from logits, with class-index or class-probability targets, as torch."""
import torch
import torch.nn.functional as F

from . import _checks as C
from ._impl import resolve
from .activations import log_softmax_values

REDUCTIONS = ("mean", "sum", "none")
#: Class-index target dtypes, those ``F.cross_entropy`` takes (it refuses int32, int16, int8).
INDEX_DTYPES = (torch.int64, torch.uint8)


def _check(logits, target, weight, ignore_index, reduction, label_smoothing, where):
    C.check_floating(logits, where, "logits")
    C.check_tensor(target, where, "target")
    if logits.dim() < 1:
        raise ValueError(f"{where}: expected logits (N, C, d1, ...), (N, C) or (C,), got ()")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: expected reduction in {REDUCTIONS}, got {reduction!r}")
    C.check_probability(label_smoothing, where, "label_smoothing")
    if not C.is_int(ignore_index):
        raise TypeError(f"{where}: expected ignore_index to be an int, got {ignore_index!r}")
    class_dim = 0 if logits.dim() == 1 else 1
    classes = logits.shape[class_dim]
    if weight is not None:
        C.check_vector(weight, classes, where, "weight", "one per class of logits", logits)
        C.check_dtype(weight, logits, where, "weight", "logits'", autocast=True)
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(f"{where}: expected class-probability target shaped like logits "
                             f"{C.shape_str(logits)}, got {C.shape_str(target)}")
        if ignore_index != -100:   # torch refuses it too: no element of a distribution is "ignored"
            raise ValueError(f"{where}: expected the default ignore_index=-100 with class-probability "
                             f"targets, got ignore_index={ignore_index}")
        return class_dim, classes, True
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"{where}: expected target of class indices (torch.int64 or torch.uint8, "
                        f"as F.cross_entropy; convert others with .long()) or class probabilities "
                        f"(floating dtype), got {target.dtype}")
    expected = tuple(logits.shape[:class_dim]) + tuple(logits.shape[class_dim + 1:])
    if tuple(target.shape) != expected:
        raise ValueError(f"{where}: expected class-index target of shape {expected} (logits are "
                         f"{C.shape_str(logits)}), got {C.shape_str(target)}")
    return class_dim, classes, False


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, impl=None):
    """Cross-entropy between ``softmax(logits)`` and a target, as ``F.cross_entropy``.

    With ``logp = log_softmax(logits)`` over the class axis, ``w`` the class weights (ones when
    None), ``eps = label_smoothing`` and ``K`` classes:

    * class indices ``t`` (elements equal to ``ignore_index`` count as 0 and leave the mean):
      ``l_i = (1 - eps) * (-w[t_i] logp[i, t_i]) + eps / K * (-sum_c w_c logp[i, c])``;
      ``"mean"`` divides ``sum_i l_i`` by ``sum_i w[t_i]`` over non-ignored ``i``.
    * class probabilities ``q`` (same shape as logits; ``ignore_index`` must stay -100, as torch):
      ``q' = (1 - eps) q + eps / K``, ``l_i = -sum_c w_c q'[i, c] logp[i, c]``;
      ``"mean"`` divides by the number of ``i`` (``N * d1 * ...``).

    Args:
      logits: ``(N, C, d1, ...)``, ``(N, C)`` or unbatched ``(C,)``.
      target: ``(N, d1, ...)`` / ``(N,)`` / ``()`` indices of dtype int64 or uint8 (the two
        ``F.cross_entropy`` takes; int32 is refused, in both formulations), or floating
        probabilities shaped like ``logits``. Index values are not range-checked here (that
        would read values).
      weight: ``(C,)`` or None. reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-element
        ``(N, d1, ...)``). label_smoothing: in ``[0, 1]``.
      impl: ``"fast"`` (``F.cross_entropy``), ``"explicit"`` (log_softmax, gather, weights and
        smoothing written out) or None (the default).

    Returns:
      a scalar, or the per-element losses for ``reduction="none"``.
    """
    where = "cross_entropy"
    impl = resolve(impl, where)
    class_dim, classes, probabilities = _check(logits, target, weight, ignore_index, reduction,
                                               label_smoothing, where)
    if impl == "fast":
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)

    return ExplicitCrossEntropy.apply(logits, target, weight, class_dim, probabilities, ignore_index,
                                      reduction, float(label_smoothing))


def _class_weights(weight, logits, class_dim):
    """``(w, w_b)``: the class weights (ones for None) and their view broadcasting on logits."""
    classes = logits.shape[class_dim]
    w = torch.ones(classes, dtype=logits.dtype, device=logits.device) if weight is None else weight
    return w, w.reshape((classes,) + (1,) * (logits.dim() - class_dim - 1))


def _valid_targets(target, ignore_index):
    """``(valid, safe)``: where the class index is not ignored, and the indices with the ignored
    ones replaced by 0 (so they can index; their terms are zeroed by ``valid``)."""
    target = target.long()     # uint8 indices would index w[...] as a boolean mask
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device))


class ExplicitCrossEntropy(torch.autograd.Function):
    """``cross_entropy``'s explicit formulation with its backward written out.

    Both kinds of target are one formula. Let ``a[i, c]`` be the target distribution after
    smoothing: ``(1 - eps) q[i, c] + eps / K`` for class probabilities, and for class indices
    ``valid_i ((1 - eps) [c = t_i] + eps / K)`` (``valid_i = 0`` where ``t_i`` is ignored). Then
    ``l_i = -sum_c w_c a[i, c] logp[i, c]``. With ``p = softmax(logits)`` and
    ``dlogp_c / dz_k = [c = k] - p_k`` (log-softmax's Jacobian):

        dl_i / dz[i, k] = p[i, k] S_i - w_k a[i, k],      S_i = sum_c w_c a[i, c]

    "softmax minus the target", each scaled: without class weights ``S_i = valid_i`` and it is
    ``valid_i p - a``. The reduction multiplies by the output gradient ``g``: per element
    (``"none"``), the same for all (``"sum"``), or ``g / D`` for ``"mean"``, ``D = sum_i w[t_i]
    valid_i`` (class indices) or the number of elements (probabilities). Further:

        d q[i, c] = -g_i (1 - eps) w_c logp[i, c]                      (probability targets)
        d w_c = -sum_i g_i a[i, c] logp[i, c]  - [indices, "mean"] g L count_c / D

    where ``count_c`` is the number of non-ignored targets of class ``c``: the mean's
    denominator ``D`` holds the weights too (torch gives no gradient for ``weight`` with class
    indices; plain autograd of this formula does, and so does this backward).

    ``logp`` is recomputed from the logits in the backward rather than saved.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, class_dim, probabilities, ignore_index, reduction, eps):
        classes = logits.shape[class_dim]
        logp = log_softmax_values(logits, class_dim)
        w, w_b = _class_weights(weight, logits, class_dim)
        if probabilities:
            q = target * (1 - eps) + eps / classes if eps > 0 else target
            per_element = -(logp * q * w_b).sum(dim=class_dim)
            if reduction == "none":
                return per_element
            total = per_element.sum()
            return total / (logp.numel() // classes) if reduction == "mean" else total

        valid, safe = _valid_targets(target, ignore_index)
        picked = logp.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)   # logp[i, t_i]
        w_t = w[safe] * valid.to(w.dtype)                     # w[t_i], 0 where ignored
        nll = -w_t * picked
        if eps > 0:
            smooth = -(logp * w_b).sum(dim=class_dim) * valid.to(logp.dtype)
            per_element = (1 - eps) * nll + (eps / classes) * smooth
        else:
            per_element = nll
        if reduction == "none":
            return per_element
        total = per_element.sum()
        return total / w_t.sum() if reduction == "mean" else total

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, *hyper = inputs
        ctx.save_for_backward(logits, target, weight, output)
        ctx.hyper = hyper

    @staticmethod
    def backward(ctx, d_loss):
        logits, target, weight, loss = ctx.saved_tensors
        class_dim, probabilities, ignore_index, reduction, eps = ctx.hyper
        classes = logits.shape[class_dim]
        logp = log_softmax_values(logits, class_dim)
        w, w_b = _class_weights(weight, logits, class_dim)
        if probabilities:
            a = target * (1 - eps) + eps / classes
            denominator = logp.numel() // classes
        else:
            valid, safe = _valid_targets(target, ignore_index)
            class_ids = torch.arange(classes, device=logits.device).reshape(w_b.shape)
            one_hot = (class_ids == safe.unsqueeze(class_dim)).to(logits.dtype)      # [c = t_i]
            a = ((1 - eps) * one_hot + eps / classes) * valid.unsqueeze(class_dim).to(logits.dtype)
            denominator = (w[safe] * valid.to(w.dtype)).sum()                         # D
        g = d_loss / denominator if reduction == "mean" else d_loss
        g = g.unsqueeze(class_dim) if reduction == "none" else g                      # per element
        weighted = w_b * a                                                            # w_c a[i, c]
        need_logits, need_target, need_weight = ctx.needs_input_grad[:3]
        d_logits = d_target = d_weight = None
        if need_logits:
            d_logits = g * (torch.exp(logp) * weighted.sum(dim=class_dim, keepdim=True) - weighted)
        if need_target:
            d_target = -g * (1 - eps) * w_b * logp
        if need_weight:
            others = [i for i in range(logits.dim()) if i != class_dim]
            # sum(dim=[]) would sum every axis: an unbatched (C,) input has nothing to sum.
            per_class = (lambda t: t.sum(dim=others)) if others else (lambda t: t)    # noqa: E731
            d_weight = -per_class(g * a * logp)
            if reduction == "mean" and not probabilities:      # D = sum_i w[t_i] valid_i
                counts = per_class(one_hot * valid.unsqueeze(class_dim).to(logits.dtype))
                d_weight = d_weight - d_loss * loss / denominator * counts
        return d_logits, d_target, d_weight, None, None, None, None, None
