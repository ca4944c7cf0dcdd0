"""The TAPS gate: ``w = w_base + I(s >= tau) * delta`` with a straight-through score gradient.

One fused autograd function builds the gated weight, so the backward pass needs no
intermediate ``gate * delta`` tensor and the score gradient is a single reduction:

* ``dL/dw_base = dL/dw``                       (only when the base is trainable)
* ``dL/ddelta  = I(s >= tau) * dL/dw``          (an inactive delta receives zeros)
* ``dL/ds      = <dL/dw, delta>``               (straight-through: d(w_base + s*delta)/ds)

The gate is known on the host when the weight is built (``TapsModel`` reads every gate of a
forward with one device sync), so an inactive layer does no add at all; the score always stays
in its own (fp32) dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gate_open", "closed_score", "gated_weight"]


def gate_open(score: Tensor, threshold: float) -> Tensor:
    """``score >= threshold`` as a bool tensor (one score or a stack of them, no gradient).

    The one gate rule of the package: the forward, ``gate_states``, ``count_params``,
    ``save_task``, ``load_task`` and ``merge`` all decide through it. The comparison runs in
    the score's dtype with ``threshold`` rounded to it (PyTorch's tensor-vs-float rule, as in
    the authors' code), so a score equal to fp32(0.7), which lies below 0.7, is active;
    comparing Python floats instead would call that layer inactive.
    """
    return score.detach() >= threshold


def compose_weight(base: Tensor, delta: Tensor, active: bool) -> Tensor:
    """``w_base + I * delta`` for a gate known on the host: the one place the TAPS weight is
    composed (forward, the fused layer's forward and backward, the inference cache, merging)."""
    return base + delta if active else base


#: How far below ``tau`` a switched-off layer's score is set (:func:`closed_score`).
CLOSE_MARGIN = 1e-3


def closed_score(threshold: float) -> float:
    """The score that switches a layer off while keeping it trainable: just below ``threshold``
    (by :data:`CLOSE_MARGIN`), so :func:`gate_open` reads it closed and its gradient can still
    bring it back. What budget enforcement writes."""
    return threshold - CLOSE_MARGIN


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` without a temporary of their size (fp32 accumulation for half tensors, fp64
    stays fp64). Both are flattened in ``a``'s memory order, a view when they share a layout
    (e.g. both channels_last, where a plain ``reshape(-1)`` would copy each)."""
    order = sorted(range(a.dim()), key=a.stride, reverse=True)
    a, b = a.permute(order).reshape(-1), b.permute(order).reshape(-1)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    if a.dtype != dtype or b.dtype != dtype:
        a, b = a.to(dtype), b.to(dtype)
    return torch.dot(a, b)


class _KnownGateWeight(torch.autograd.Function):
    """The same function when the gate is already known on the host: an inactive layer does
    no add at all, an active one passes ``dL/dw`` to ``delta`` without a multiply."""

    @staticmethod
    def forward(ctx, base: Tensor, delta: Tensor, score: Tensor, active: bool) -> Tensor:
        ctx.active = active
        ctx.save_for_backward(delta)
        ctx.score_dtype, ctx.score_shape = score.dtype, score.shape
        return compose_weight(base, delta, True) if active else base.view_as(base)

    @staticmethod
    def backward(ctx, grad_w: Tensor):
        (delta,) = ctx.saved_tensors
        need_base, need_delta, need_score, _ = ctx.needs_input_grad
        return (*known_gate_grads(grad_w, delta, ctx.active, need_base, need_delta, need_score,
                                  ctx.score_dtype, ctx.score_shape), None)


def known_gate_grads(grad_w: Tensor, delta: Tensor, active: bool, need_base: bool, need_delta: bool,
                     need_score: bool, score_dtype: torch.dtype, score_shape: torch.Size):
    """``(dL/dw_base, dL/ddelta, dL/ds)`` from ``dL/dw`` for a gate known on the host (``None``
    where not needed): ``dL/dw``, ``I(s) dL/dw`` and ``<dL/dw, delta>``."""
    grad_base = grad_w if need_base else None
    grad_delta = None
    if need_delta:
        if not active:
            grad_delta = torch.zeros_like(delta)  # explicit zeros keep DDP's reducer complete
        else:  # never hand one tensor to two parameters' .grad (in-place clipping would hit both)
            grad_delta = grad_w.clone() if need_base else grad_w
    grad_score = _dot(grad_w, delta).to(score_dtype).reshape(score_shape) if need_score else None
    return grad_base, grad_delta, grad_score


def gated_weight(base: Tensor, delta: Tensor, score: Tensor, threshold: float, active: bool | None = None) -> Tensor:
    """Return ``base + I(score >= threshold) * delta`` with the TAPS straight-through gradient.

    Args:
        base: the shared (pre-trained) weight.
        delta: the task-specific perturbation, same shape as ``base``.
        score: the scalar layer score ``s``.
        threshold: ``tau``; the layer is task-specific when ``s >= tau``.
        active: ``I(score >= threshold)`` if the caller already knows it (``TapsModel`` reads
            all gates of a forward with one device sync); ``None`` reads it here (one sync).
    """
    if active is None:
        active = bool(gate_open(score, threshold))
    return _KnownGateWeight.apply(base, delta, score, bool(active))
