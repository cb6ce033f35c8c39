"""Focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` (Lin et al. 2017), softmax and sigmoid forms."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from segtrain import native
from segtrain.losses.base import (
    LossParamError,
    SegLoss,
    check_length,
    class_vector,
    reduce_channels,
    reduce_pixels,
    register_loss,
)
from segtrain.losses.target import PreparedTarget

# Exponentials are taken as exp2(x * log2(e)): torch's CPU exp costs 0.8 ns an element on our
# 2-core machine against 0.3 for exp2 (the product's rounding adds ~1e-7 relative error per
# unit of |x|). exp2 is as fast as exp on CUDA.
LOG2_E = 1.0 / math.log(2.0)


class _SoftmaxFocal(torch.autograd.Function):
    """Per-pixel softmax focal loss with an analytic backward.

    On the CPU (float32/float64) both directions are one call of the C kernel in
    ``segtrain/native/focal.c``, which saves only per-pixel values and recomputes the
    softmax in the backward. Elsewhere (CUDA, half precision, no C compiler) PyTorch ops:
    autograd through the plain formula would keep ~6 full (N, C, ...) tensors and walk
    them several times; here the softmax is written out: ``m`` = the max over classes,
    ``e = exp(x - m)`` (one full tensor), ``s`` = its sum over classes, and
    ``log p_t = x_t - m - log s`` per pixel, with ``x_t`` gathered from the logits. ``e``
    is normalised to ``p`` in place and kept, so the backward is one multiply of ``p`` by
    a per-pixel factor and a scatter at the target class, written into one new tensor
    (the gradient): no second exponential, unlike cross-entropy's (log_softmax's) backward.
    With ``l = log p_t`` and ``L = -w (1 - p_t)^g l``:
    ``dL/dl = -w (1 - p_t)^(g-1) (1 - p_t - g p_t l)`` and ``dl/dx_j = [j == t] - p_j``.
    For ``g < 1``, ``(1 - p_t)^(g-1)`` is infinite at ``p_t = 1``; there the gradient is
    taken as ``(1 - p_t)^g (1 - g p_t l / (1 - p_t))`` with ``l / (1 - p_t) -> -1``, so it
    stays finite on saturated logits (torchvision's ``(1 - p) ** g`` form gives NaN).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, logits: Tensor, index: Tensor, gamma: float, weight: Tensor | None
    ) -> Tensor:
        ctx.input_dtype = logits.dtype
        ctx.native = native.usable(logits)
        if ctx.native:  # the fused C kernel (segtrain/native/focal.c): same formulas, one pass each way
            x, index = logits.contiguous(), index.to(torch.int64).contiguous()
            weight = None if weight is None else torch.broadcast_to(weight, index.shape).to(x.dtype).contiguous()
            loss, neg_grad_log_p_t, log_sum_exp = native.focal_forward(x, index, weight, gamma)
            ctx.save_for_backward(x, index, neg_grad_log_p_t, log_sum_exp)
            return loss
        # Half-precision logits are computed in float32 (as autocast does for cross-entropy).
        x = logits.to(torch.float32) if logits.dtype in (torch.float16, torch.bfloat16) else logits
        x = x.contiguous()
        batch, classes, pixels = x.shape[0], x.shape[1], math.prod(index.shape[1:])
        # Where each pixel's target class sits in its sample's (C x pixels) values: a gather and
        # a scatter along the contiguous last dimension of (N, C * pixels), which on the CPU run
        # at 2.5x the speed of torch.gather/scatter_add_ along the class dimension.
        offsets = torch.add(torch.arange(pixels, device=x.device), index.reshape(batch, pixels), alpha=pixels)
        x_t = x.view(batch, classes * pixels).gather(1, offsets).view(index.shape)
        top = x.amax(1, keepdim=True)
        exps = torch.sub(x, top).mul_(LOG2_E).exp2_()  # exp(x - m), the softmax's numerators
        sums = exps.sum(1)
        # log p_t = x_t - m - log s; log s = log2(s) ln 2 (log and log2 cost the same here).
        log_p_t = x_t.sub_(top.squeeze(1)).sub_(sums.log2(), alpha=math.log(2.0))
        del top
        # Everything below is per pixel (1/C of the logits), kept to few passes: on a busy
        # CPU each op costs a thread-pool wake-up as well as its arithmetic.
        if gamma == 0:
            loss = -log_p_t
            # -dL/dl (the sign is applied in backward, saving a pass here).
            neg_grad_log_p_t = torch.ones_like(log_p_t)
        else:
            p_t = log_p_t.mul(LOG2_E).exp2_()
            # -expm1 is the accurate 1 - p_t, but PyTorch's CPU expm1 is not vectorised (about
            # 10x exp: more than the whole softmax). In float32, 1 - p_t is off by at most
            # 6e-8 absolute, and only near p_t = 1, where the loss (1 - p_t)^gamma |log p_t| is tiny.
            one_minus_p_t = torch.expm1(log_p_t).neg_() if log_p_t.is_cuda else torch.rsub(p_t, 1.0)
            # In-place where a per-pixel tensor is not needed again: fewer allocations, lower peak memory.
            if gamma >= 1:
                # -dL/dl = (1 - p_t)^(g-1) (1 - p_t - g p_t l): finite everywhere for g >= 1.
                # Written over p_t (not needed after): one per-pixel tensor less at the forward's peak.
                neg_grad_log_p_t = torch.addcmul(one_minus_p_t, p_t, log_p_t, value=-gamma, out=p_t)
                del p_t
                if gamma == 1:
                    modulator = one_minus_p_t
                else:
                    base = one_minus_p_t if gamma == 2 else one_minus_p_t.pow(gamma - 1)
                    neg_grad_log_p_t.mul_(base)
                    modulator = base.mul_(one_minus_p_t)  # (1 - p_t)^g
            else:
                # (1 - p_t)^(g-1) is infinite at p_t = 1 for g < 1; write it as (1 - p_t)^g / (1 - p_t) and
                # use l / (1 - p_t) -> -1 there (0/0 at l == 0, l/0 where p_t rounds to 1).
                modulator = one_minus_p_t.pow(gamma)
                ratio = torch.div(log_p_t, one_minus_p_t).nan_to_num_(nan=-1.0, neginf=-1.0)
                neg_grad_log_p_t = ratio.mul_(p_t).mul_(-gamma).add_(1.0).mul_(modulator)
                del p_t
            loss = modulator.mul_(log_p_t).neg_()
        if weight is not None:  # alpha and the ignore mask, one factor per pixel
            loss.mul_(weight)
            neg_grad_log_p_t.mul_(weight)
        # Normalised for the backward, p_j = e_j / s, by one multiply with 1 / s (the division is
        # twice as slow here): keeping s instead would put one more per-pixel tensor in its peak.
        probs = exps.mul_(sums.reciprocal_().unsqueeze(1))
        ctx.save_for_backward(probs, offsets, neg_grad_log_p_t)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.native:
            x, index, neg_grad_log_p_t, log_sum_exp = ctx.saved_tensors
            coefficient = (grad_loss * neg_grad_log_p_t).contiguous()
            return native.focal_backward(x, index, coefficient, log_sum_exp), None, None, None
        probs, offsets, neg_grad_log_p_t = ctx.saved_tensors
        # dL/dx_j = dL/dl * ([j == t] - p_j) = c p_j - c [j == t] with c = -dL/dl * grad_loss.
        coefficient = grad_loss * neg_grad_log_p_t
        grad = probs * coefficient.unsqueeze(1)
        grad.view(offsets.shape[0], -1).scatter_add_(1, offsets, coefficient.neg_().view(offsets.shape))
        return grad.to(ctx.input_dtype), None, None, None


def softmax_focal_loss(
    logits: Tensor, index: Tensor, gamma: float, alpha_t: Tensor | None = None, counted: Tensor | None = None
) -> Tensor:
    """Per-pixel softmax focal loss ``(N, *spatial)``.

    ``index`` must hold valid classes; ``counted`` (bool, ``None`` = all) marks the pixels
    that count: elsewhere, whatever class ``index`` holds, loss and gradient are 0.
    ``alpha_t`` is the alpha of each pixel's target class.
    """
    weight = alpha_t  # one factor per pixel carries alpha and the ignore mask
    if counted is not None:
        # 1.0 / 0.0 through uint8: torch's CPU bool -> float conversion is 8x slower than uint8 -> float.
        mask = counted.view(torch.uint8).to(torch.promote_types(logits.dtype, torch.float32))
        weight = mask if alpha_t is None else mask.mul_(alpha_t)
    return _SoftmaxFocal.apply(logits, index, float(gamma), weight)


def sigmoid_focal_elements(logits: Tensor, dense: Tensor, gamma: float, alpha: Tensor | float | None) -> Tensor:
    """Element-wise sigmoid focal loss, the values of ``torchvision.ops.sigmoid_focal_loss``.

    Written with ``logsigmoid`` of the signed logit: ``(1 - p_t)^g = exp(g logsigmoid(-z))``
    has a finite gradient everywhere, where torchvision's ``(1 - p_t) ** g`` gives NaN
    for ``g < 1`` once ``p_t`` rounds to 1.
    """
    signed = logits * (2.0 * dense - 1.0)  # z with p_t = sigmoid(z)
    loss = -F.logsigmoid(signed)
    if gamma != 0:
        loss = loss * torch.exp(gamma * F.logsigmoid(-signed))
    if alpha is not None:
        loss = loss * (alpha * dense + (1.0 - alpha) * (1.0 - dense))
    return loss


@register_loss("focal")
class FocalLoss(SegLoss):
    """Focal loss ``-alpha_t (1 - p_t)^gamma log p_t``.

    ``activation=softmax`` (multi-class): computed from ``log_softmax`` (no clamping)
    with a fused analytic backward; ``alpha`` is null, a scalar multiplier, or one
    float per class (``auto``: median-frequency weights); with ``gamma=0`` and no
    alpha it equals cross-entropy. ``activation=sigmoid``: binary (1 channel, target
    == 1 positive) or multi-label (C channels, one-hot); per element it equals
    ``torchvision.ops.sigmoid_focal_loss`` (``alpha`` in [0, 1] weights positives,
    ``1 - alpha`` negatives; a list gives one alpha per channel).

    Conventions: the softmax mean is over counted pixels, not pixels x classes, so
    gamma=0 equals CE; the sigmoid mean is over the elements of counted pixels, as
    torchvision and BCE. alpha multiplies the loss and never enters the mean's
    denominator (as torchvision), whereas CE's class ``weight`` does (as torch).
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | list[float] | None = None,
        activation: str = "softmax",
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(ignore_index, reduction)
        if activation not in ("softmax", "sigmoid"):
            raise LossParamError("loss.activation", f"{activation!r} is not one of softmax, sigmoid")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
            raise LossParamError("loss.gamma", f"{gamma!r} must be a number >= 0")
        alpha = class_vector(alpha, "alpha", scalar_ok=True)
        if alpha is not None:
            values = torch.as_tensor(alpha)
            upper = 1.0 if activation == "sigmoid" else float("inf")
            if bool((values < 0).any() or (values > upper).any()):
                limits = "[0, 1] (the weight of positives; negatives get 1 - alpha)" if upper == 1.0 else ">= 0"
                raise LossParamError("loss.alpha", f"{_alpha_text(alpha)} must be in {limits}")
        self.activation = activation
        self.gamma = float(gamma)
        self.sigmoid = activation == "sigmoid"
        self.softmax = activation == "softmax"
        self.scalar_alpha = alpha if isinstance(alpha, float) else None
        self.register_buffer("alpha", alpha if isinstance(alpha, Tensor) else None, persistent=False)

    @classmethod
    def uses_sigmoid(cls, params: dict[str, Any]) -> bool:
        return params.get("activation", "softmax") == "sigmoid"

    def compute(self, logits: Tensor, target: PreparedTarget) -> Tensor:
        alpha: Tensor | float | None = self.scalar_alpha
        if self.alpha is not None:
            check_length(self, "alpha", self.alpha, logits.shape[1])
            alpha = self.alpha.to(device=logits.device, dtype=logits.dtype)
        if self.sigmoid:
            if isinstance(alpha, Tensor):
                alpha = alpha.view((-1,) + (1,) * (logits.dim() - 2))
            elements = sigmoid_focal_elements(logits, target.dense(logits.dtype), self.gamma, alpha)
            return reduce_channels(elements, target.valid, self.reduction, target.num_counted)
        alpha_t = alpha[target.index] if isinstance(alpha, Tensor) else None
        pixel_loss = softmax_focal_loss(logits, target.index, self.gamma, alpha_t, target.valid)
        if isinstance(alpha, float):
            pixel_loss = pixel_loss * alpha
        denominator = None if target.valid is None else target.num_counted
        return reduce_pixels(pixel_loss, self.reduction, denominator)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, activation={self.activation!r}, " + super().extra_repr()


def _alpha_text(alpha: Tensor | float) -> str:
    return f"{alpha.tolist() if isinstance(alpha, Tensor) else alpha}"
