"""Losses: equality with torch/torchvision (values and gradients), gradcheck, ignore index,
reductions, errors, auto parameters, and every registered loss built from its YAML file."""
from __future__ import annotations

import itertools
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn._reduction import legacy_get_string
from torchvision.ops import sigmoid_focal_loss

from segtrain.losses import LossParamError, build_loss, loss_terms, resolve_auto, with_ignore_index
from segtrain.losses.focal import softmax_focal_loss
from segtrain.losses.regression import hard_negative_mask
from segtrain.registry import LOSSES
from segtrain.errors import UnknownNameError

REPO = Path(__file__).resolve().parents[1]
LOSS_CONFIGS = REPO / "configs" / "loss"
IGNORE = 255
REDUCTIONS = ["mean", "sum", "none"]
SHAPES = {"2d": (2, 4, 5, 6), "3d": (2, 4, 3, 4, 5)}


def make_input(shape, ignore: bool = False, dtype=torch.float32, seed: int = 0, classes: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()
    num = classes if classes is not None else shape[1]
    target = torch.randint(0, num, (shape[0], *shape[2:]), generator=generator)
    if ignore:
        target.view(-1)[::4] = IGNORE
    return logits, target


def grad_of(loss_fn, logits, target):
    logits = logits.detach().clone().requires_grad_()
    value = loss_fn(logits, target)
    (value.sum() if value.dim() else value).backward()
    return value.detach(), logits.grad


def one_hot(target, channels, dtype=torch.float32):
    return F.one_hot(target, channels).movedim(-1, 1).to(dtype)


def assert_same(ours, reference, logits, target, atol=1e-6, rtol=1e-5):
    value, grad = grad_of(ours, logits, target)
    ref_value, ref_grad = grad_of(reference, logits, target)
    torch.testing.assert_close(value, ref_value, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol)


# --- the worked examples --------------------------------------------------------------


def test_worked_examples():
    assert torch.nn.L1Loss()(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 2, 5])).item() == pytest.approx(0.6667, abs=1e-4)
    assert torch.nn.MSELoss()(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 2, 5])).item() == pytest.approx(1.3333, abs=1e-4)
    # One pixel, three channels, target class 0 (one-hot [1, 0, 0]): prediction [1, 0, 2] is off by [0, 0, 2],
    # the same differences as [1, 2, 3] vs [1, 2, 5].
    prediction, target = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([0])
    assert build_loss("l1", activation="none")(prediction, target).item() == pytest.approx(0.6667, abs=1e-4)
    assert build_loss("mse", activation="none")(prediction, target).item() == pytest.approx(1.3333, abs=1e-4)
    logits, target = torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([1])
    assert torch.nn.CrossEntropyLoss()(logits, target).item() == pytest.approx(1.1019, abs=1e-4)
    for name, params in [("ce", {}), ("nll", {}), ("focal", {"gamma": 0.0})]:
        assert build_loss(name, **params)(logits, target).item() == pytest.approx(1.1019, abs=1e-4), name


# --- equality with torch --------------------------------------------------------------


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", [False, True])
def test_ce_and_nll_match_torch(dims, reduction, ignore):
    logits, target = make_input(SHAPES[dims], ignore)
    weight = [0.5, 1.0, 2.0, 1.5]
    torch_ignore = IGNORE if ignore else -100
    for params in [{}, {"weight": weight}, {"label_smoothing": 0.1}, {"weight": weight, "label_smoothing": 0.2}]:
        ours = build_loss("ce", ignore_index=IGNORE if ignore else None, reduction=reduction, **params)
        w = torch.tensor(params["weight"]) if "weight" in params else None
        reference = torch.nn.CrossEntropyLoss(
            weight=w, ignore_index=torch_ignore, reduction=reduction, label_smoothing=params.get("label_smoothing", 0.0)
        )
        assert_same(ours, reference, logits, target)
    ours = build_loss("nll", weight=weight, ignore_index=IGNORE if ignore else None, reduction=reduction)
    reference = torch.nn.NLLLoss(weight=torch.tensor(weight), ignore_index=torch_ignore, reduction=reduction)
    assert_same(ours, lambda x, t: reference(F.log_softmax(x, 1), t), logits, target)


def test_weighted_mean_divides_by_summed_weights_of_counted_pixels():
    logits, target = make_input((1, 3, 2, 2))
    target = torch.tensor([[[0, 1], [2, IGNORE]]])
    weight = torch.tensor([1.0, 2.0, 3.0])
    ours = build_loss("ce", weight=weight.tolist(), ignore_index=IGNORE)(logits, target)
    per_pixel = build_loss("ce", weight=weight.tolist(), ignore_index=IGNORE, reduction="none")(logits, target)
    assert per_pixel[0, 1, 1] == 0
    torch.testing.assert_close(ours, per_pixel.sum() / (1.0 + 2.0 + 3.0))


def _masked_elementwise(elements, target, reduction):
    """Reference reduction for element-wise losses with ignored pixels: torch on the counted pixels only."""
    valid = (target != IGNORE).unsqueeze(1).to(elements.dtype)
    elements = elements * valid
    if reduction == "none":
        return elements.mean(1)
    if reduction == "sum":
        return elements.sum()
    return elements.sum() / (valid.sum() * elements.shape[1])


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("binary", [True, False])
def test_bce_matches_torch(dims, reduction, binary):
    shape = SHAPES[dims]
    shape = (shape[0], 1, *shape[2:]) if binary else shape
    logits, target = make_input(shape, classes=2 if binary else None)
    channels = shape[1]
    dense = (target == 1).unsqueeze(1).float() if binary else one_hot(target, channels)
    view = (channels,) + (1,) * (len(shape) - 2)
    for pos_weight in [None, 3.0, [float(c + 1) for c in range(channels)]]:
        ours = build_loss("bce", pos_weight=pos_weight, reduction=reduction)
        pw = None if pos_weight is None else torch.as_tensor(pos_weight).reshape(-1).expand(channels).reshape(view)
        torch_reduction = "mean" if reduction == "none" else reduction

        def reference(x, t):
            loss = F.binary_cross_entropy_with_logits(x, dense, pos_weight=pw, reduction="none")
            return loss.mean(1) if reduction == "none" else torch.nn.BCEWithLogitsLoss(pos_weight=pw, reduction=torch_reduction)(x, dense)

        assert_same(ours, reference, logits, target)
    # With ignored pixels: torch's loss on the counted pixels only.
    target = target.clone()
    target.view(-1)[::3] = IGNORE
    dense = (target == 1).unsqueeze(1).float() if binary else one_hot(target.clamp_max(channels - 1), channels)
    ours = build_loss("bce", ignore_index=IGNORE, reduction=reduction)
    reference = lambda x, t: _masked_elementwise(F.binary_cross_entropy_with_logits(x, dense, reduction="none"), t, reduction)
    assert_same(ours, reference, logits, target)


REGRESSIONS = {
    "mse": (lambda p, t: F.mse_loss(p, t, reduction="none"), {}),
    "l1": (lambda p, t: F.l1_loss(p, t, reduction="none"), {}),
    "smooth_l1": (lambda p, t: F.smooth_l1_loss(p, t, reduction="none", beta=0.3), {"beta": 0.3}),
    "huber": (lambda p, t: F.huber_loss(p, t, reduction="none", delta=0.4), {"delta": 0.4}),
}
ACTIVATE = {"softmax": lambda x: torch.softmax(x, 1), "sigmoid": torch.sigmoid, "none": lambda x: x}


@pytest.mark.parametrize("name", REGRESSIONS)
@pytest.mark.parametrize("activation", ACTIVATE)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dims", SHAPES)
def test_regression_losses_match_torch(name, activation, reduction, dims):
    elementwise, params = REGRESSIONS[name]
    logits, target = make_input(SHAPES[dims])
    dense = one_hot(target, logits.shape[1])
    ours = build_loss(name, activation=activation, reduction=reduction, **params)

    def reference(x, t):
        elements = elementwise(ACTIVATE[activation](x), dense)
        return {"mean": elements.mean(), "sum": elements.sum(), "none": elements.mean(1)}[reduction]

    assert_same(ours, reference, logits, target)
    if activation == "softmax" and reduction == "mean":  # mean == torch.nn.MSELoss etc. on (activated, one-hot)
        torch_loss = {"mse": torch.nn.MSELoss(), "l1": torch.nn.L1Loss(), "smooth_l1": torch.nn.SmoothL1Loss(beta=0.3),
                      "huber": torch.nn.HuberLoss(delta=0.4)}[name]
        assert_same(ours, lambda x, t: torch_loss(torch.softmax(x, 1), dense), logits, target)
    target_ignored = target.clone()
    target_ignored.view(-1)[::3] = IGNORE
    dense = one_hot(target_ignored.clamp_max(logits.shape[1] - 1), logits.shape[1])
    ours = build_loss(name, activation=activation, reduction=reduction, ignore_index=IGNORE, **params)
    reference = lambda x, t: _masked_elementwise(elementwise(ACTIVATE[activation](x), dense), t, reduction)
    assert_same(ours, reference, logits, target_ignored)


# --- focal ----------------------------------------------------------------------------


def reference_softmax_focal(x, t, gamma, alpha=None, ignore_index=None, reduction="mean"):
    """The plain formula through autograd, for comparison."""
    valid = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    index = torch.where(valid, t, 0)
    log_p_t = F.log_softmax(x, 1).gather(1, index.unsqueeze(1)).squeeze(1)
    loss = -((1 - log_p_t.exp()) ** gamma) * log_p_t
    if isinstance(alpha, float):
        loss = loss * alpha
    elif alpha is not None:
        loss = loss * torch.as_tensor(alpha, dtype=x.dtype)[index]
    loss = loss * valid
    return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / valid.sum()}[reduction]


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", [False, True])
def test_focal_gamma_zero_equals_cross_entropy(dims, reduction, ignore):
    logits, target = make_input(SHAPES[dims], ignore)
    ours = build_loss("focal", gamma=0.0, ignore_index=IGNORE if ignore else None, reduction=reduction)
    reference = torch.nn.CrossEntropyLoss(ignore_index=IGNORE if ignore else -100, reduction=reduction)
    assert_same(ours, reference, logits, target)


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma,alpha", [(2.0, None), (0.5, [0.1, 0.2, 0.3, 0.4]), (3.0, 0.25), (1.0, None)])
def test_softmax_focal_matches_plain_formula(dims, reduction, gamma, alpha):
    logits, target = make_input(SHAPES[dims], ignore=True)
    ours = build_loss("focal", gamma=gamma, alpha=alpha, ignore_index=IGNORE, reduction=reduction)
    reference = lambda x, t: reference_softmax_focal(x, t, gamma, alpha, IGNORE, reduction)
    assert_same(ours, reference, logits, target)


def test_focal_alpha_does_not_enter_the_mean_denominator():
    logits, target = make_input((2, 3, 4, 4))
    plain = build_loss("focal", gamma=2.0)(logits, target)
    scaled = build_loss("focal", gamma=2.0, alpha=[0.5, 0.5, 0.5])(logits, target)
    torch.testing.assert_close(scaled, 0.5 * plain)


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [0.25, None, 0.9])
def test_sigmoid_focal_matches_torchvision(dims, reduction, alpha):
    shape = SHAPES[dims]
    # Binary: one output channel, target == 1 positive.
    logits, target = make_input((shape[0], 1, *shape[2:]), classes=2)
    dense = (target == 1).unsqueeze(1).float()
    ours = build_loss("focal", gamma=2.0, alpha=alpha, activation="sigmoid", reduction=reduction)
    tv_reduction = "none" if reduction == "none" else reduction

    def reference(x, t):
        loss = sigmoid_focal_loss(x, dense, alpha=-1 if alpha is None else alpha, gamma=2.0, reduction=tv_reduction)
        return loss.squeeze(1) if reduction == "none" else loss

    assert_same(ours, reference, logits, target)
    # Multi-label: C channels, one-hot target; mean/sum over elements like torchvision.
    logits, target = make_input(shape)
    dense = one_hot(target, shape[1])

    def reference_multilabel(x, t):
        loss = sigmoid_focal_loss(x, dense, alpha=-1 if alpha is None else alpha, gamma=2.0, reduction=tv_reduction)
        return loss.mean(1) if reduction == "none" else loss

    assert_same(ours, reference_multilabel, logits, target)


def test_focal_saturated_logits_have_finite_gradients_where_torchvision_gives_nan():
    logits = torch.tensor([[1000.0, 0.0, 0.0], [0.0, 2000.0, 0.0], [30.0, 0.0, -5.0]], requires_grad=True)
    target = torch.tensor([0, 1, 2])
    loss = build_loss("focal", gamma=0.5)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[2].abs().sum() > 0  # the misclassified pixel still learns
    binary = torch.tensor([[[40.0, -40.0, 200.0]]], requires_grad=True)  # (1, 1, 3)
    binary_target = torch.tensor([[1, 0, 1]])
    ours = build_loss("focal", gamma=0.5, alpha=0.25, activation="sigmoid", reduction="sum")(binary, binary_target)
    ours.backward()
    assert torch.isfinite(binary.grad).all()
    tv_input = binary.detach().clone().requires_grad_()
    sigmoid_focal_loss(tv_input, (binary_target == 1).float().unsqueeze(1), gamma=0.5, reduction="sum").backward()
    assert torch.isnan(tv_input.grad).any()  # the reason for the logsigmoid form


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_focal_under_autocast_computes_in_float32(dtype):
    logits, target = make_input((2, 4, 8, 8), ignore=True)
    loss = build_loss("focal", gamma=2.0, alpha=[0.1, 0.2, 0.3, 0.4], ignore_index=IGNORE)
    half = logits.detach().to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        value = loss(half, target)
    value.backward()
    assert value.dtype == torch.float32 and half.grad.dtype == dtype
    # The same as float32 on the rounded logits: only the gradient's final cast is in half precision.
    reference, reference_grad = grad_of(loss, half.detach().float(), target)
    torch.testing.assert_close(value.detach(), reference)
    torch.testing.assert_close(half.grad.float(), reference_grad, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
def test_softmax_focal_compiles_without_graph_breaks(gamma):
    """torch.compile(fullgraph=True) fails on any graph break (a host read, an unsupported op);
    aot_eager traces forward and backward as inductor does, without needing a C compiler."""
    torch._dynamo.reset()
    logits, target = make_input((2, 4, 6, 6), ignore=True)
    loss = build_loss("focal", gamma=gamma, alpha=[0.1, 0.2, 0.3, 0.4], ignore_index=IGNORE)
    loss.check_targets = False  # as the trainer builds it: the loader has checked the values
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    assert_same(compiled, loss, logits, target)


def test_nan_logits_give_a_nan_loss():
    logits, target = make_input((2, 3, 4, 4))
    logits = logits.detach().clone()
    logits[0, 1, 2, 2] = float("nan")
    for gamma in (0.0, 0.5, 2.0):
        assert torch.isnan(build_loss("focal", gamma=gamma)(logits, target)), gamma


def test_target_values_are_checked_on_the_cpu_or_on_request():
    logits, target = make_input((2, 3, 4, 4))
    bad = target.clone()
    bad[0, 0, 0] = 5
    loss = build_loss("focal", ignore_index=IGNORE)
    with pytest.raises(ValueError, match=r"target values \[5\]"):
        loss(logits, bad)  # a CPU target: checked by default (SegLoss.check_targets=None)
    loss.check_targets = True
    with pytest.raises(ValueError, match=r"target values \[5\]"):
        loss(logits, bad)
    loss.check_targets = False  # the trainer's loss: its loader has checked the batch
    reads = []
    original = torch.Tensor.tolist
    try:
        torch.Tensor.tolist = lambda self: reads.append(self) or original(self)
        loss(logits, target)
    finally:
        torch.Tensor.tolist = original
    assert reads == []


def test_weighted_ce_with_every_pixel_ignored_is_zero_without_a_host_read():
    logits, _ = make_input((2, 3, 4, 4))
    target = torch.full((2, 4, 4), IGNORE)
    for name, params in [("ce", {"weight": [0.2, 0.3, 0.5]}), ("ce", {"label_smoothing": 0.1}), ("nll", {"weight": [1.0, 2.0, 3.0]})]:
        logits.grad = None
        loss = build_loss(name, ignore_index=IGNORE, **params)
        loss.check_targets = False
        value = loss(logits, target)
        value.backward()
        assert value.item() == 0.0 and (logits.grad == 0).all(), name


# --- gradcheck ------------------------------------------------------------------------

GRADCHECK_CASES = {
    "focal softmax g=2 alpha": ("focal", {"gamma": 2.0, "alpha": [0.2, 0.3, 0.5]}),
    "focal softmax g=0.5": ("focal", {"gamma": 0.5}),
    "focal softmax g=0": ("focal", {"gamma": 0.0}),
    "focal sigmoid": ("focal", {"gamma": 1.5, "alpha": 0.25, "activation": "sigmoid"}),
    "dice softmax": ("dice", {"smooth": 1.0}),
    "dice sigmoid no bg batch": ("dice", {"activation": "sigmoid", "include_background": False, "batch_dice": True}),
    "bce": ("bce", {"pos_weight": [1.0, 2.0, 0.5]}),
    "mse hnm": ("mse", {"hnm_ratio": 1.0}),
    "l1 sigmoid": ("l1", {"activation": "sigmoid"}),
    "smooth_l1": ("smooth_l1", {"beta": 0.5}),
    "huber": ("huber", {"delta": 0.5}),
    "sum": ("sum", {"terms": {"focal": {"name": "focal"}, "dice": {"name": "dice"}}, "weights": {"focal": 1.0, "dice": 0.5}}),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_gradcheck(case, dims):
    name, params = GRADCHECK_CASES[case]
    shape = (2, 3, 3, 2) if dims == "2d" else (1, 3, 2, 2, 2)
    logits, target = make_input(shape, dtype=torch.float64, seed=1)
    target.view(-1)[::5] = IGNORE
    loss = build_loss(name, ignore_index=IGNORE, **params) if name != "sum" else build_loss(name, **params)
    if name == "sum":
        loss = build_loss("sum", terms={k: {**v, "ignore_index": IGNORE} for k, v in params["terms"].items()},
                          weights=params["weights"])
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


def test_gradcheck_softmax_focal_per_pixel():
    logits, target = make_input((2, 4, 3, 3), dtype=torch.float64, seed=2)
    target[0, 0] = IGNORE
    alpha_t = torch.rand(target.shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: softmax_focal_loss(x, target, 2.5, alpha_t, IGNORE), (logits,))


# --- dice -----------------------------------------------------------------------------


def test_dice_values():
    target = torch.tensor([[[0, 1], [1, 2]]])
    perfect = one_hot(target, 3) * 100.0
    assert build_loss("dice")(perfect, target).item() == pytest.approx(0.0, abs=1e-5)
    logits, target = make_input((2, 3, 4, 4))
    probs, dense = torch.softmax(logits, 1), one_hot(target, 3)
    dice = (2 * (probs * dense).sum((2, 3)) + 1.0) / (probs.sum((2, 3)) + dense.sum((2, 3)) + 1.0)
    ours = build_loss("dice", smooth=1.0, reduction="none")(logits, target)
    torch.testing.assert_close(ours, 1 - dice)
    no_background = build_loss("dice", smooth=1.0, include_background=False)(logits, target)
    torch.testing.assert_close(no_background, (1 - dice[:, 1:]).mean())


def test_dice_sums_in_float32_under_autocast():
    logits, target = make_input((2, 3, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = build_loss("dice")(logits.bfloat16(), target)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, build_loss("dice")(logits.bfloat16().float(), target))


# --- ignore index, reductions, hard negative mining ----------------------------------


@pytest.mark.parametrize("name", ["ce", "nll", "bce", "focal", "dice", "mse", "l1", "smooth_l1", "huber"])
def test_every_pixel_ignored_gives_zero_not_nan(name):
    logits, _ = make_input((2, 3, 4, 4))
    target = torch.full((2, 4, 4), IGNORE)
    loss = build_loss(name, ignore_index=IGNORE)(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


@pytest.mark.parametrize("name", ["ce", "nll", "bce", "focal", "mse", "l1", "smooth_l1", "huber"])
@pytest.mark.parametrize("dims", SHAPES)
def test_reduction_none_is_a_per_pixel_map(name, dims):
    logits, target = make_input(SHAPES[dims], ignore=True)
    loss = build_loss(name, ignore_index=IGNORE, reduction="none")(logits, target)
    assert loss.shape == target.shape
    assert (loss[target == IGNORE] == 0).all()


def test_target_with_channel_axis_is_accepted():
    logits, target = make_input((2, 3, 4, 4))
    for name in ["ce", "focal", "dice", "mse"]:
        loss = build_loss(name)
        torch.testing.assert_close(loss(logits, target.unsqueeze(1)), loss(logits, target))


def test_hard_negative_mining_keeps_positives_and_hardest_negatives():
    pixel_loss = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3, 0.2]])
    index = torch.tensor([[1, 0, 0, 0, 0, 2]])
    kept = hard_negative_mask(pixel_loss, index, None, ratio=1.0)  # 2 positives -> 2 hardest negatives (0.7, 0.5)
    assert kept.tolist() == [[True, False, True, True, False, True]]
    assert hard_negative_mask(pixel_loss, torch.zeros_like(index), None, 3.0).sum() == 0  # no positives: nothing kept
    logits, _ = make_input((1, 3, 2, 3))
    mse = build_loss("mse", hnm_ratio=1.0)
    assert mse(logits, torch.zeros(1, 2, 3, dtype=torch.long)).item() == 0.0
    target = torch.tensor([[[1, 0, 0], [0, 0, 0]]])
    elements = F.mse_loss(torch.softmax(logits, 1), one_hot(target, 3), reduction="none").mean(1)
    kept = hard_negative_mask(elements, target, None, 1.0)
    torch.testing.assert_close(mse(logits, target), elements[kept].sum() / kept.sum())


# --- errors a user can act on --------------------------------------------------------


def test_errors_name_the_problem_and_the_config_key():
    logits, target = make_input((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\) and target \(2, 4, 5\)"):
        build_loss("ce")(logits, torch.zeros(2, 4, 5, dtype=torch.long))
    bad = target.clone()
    bad[0, 0, 0], bad[1, 0, 0] = 3, 7
    with pytest.raises(ValueError, match=r"loss=focal: target values \[3, 7\] .*dataset.num_classes"):
        build_loss("focal", ignore_index=IGNORE)(logits, bad)
    with pytest.raises(ValueError, match="1 output channel.*sigmoid"):
        build_loss("ce")(logits[:, :1], target.clamp_max(1))
    with pytest.raises(ValueError, match=r"target values \[2\].*binary.*dataset.num_classes"):
        build_loss("bce")(logits[:, :1], target)
    with pytest.raises(ValueError, match=r"loss.weight has 2 values but the model has 3 output channels"):
        build_loss("ce", weight=[1.0, 2.0])(logits, target)
    with pytest.raises(ValueError, match=r"loss.alpha has 2 values"):
        build_loss("focal", alpha=[0.1, 0.2])(logits, target)
    with pytest.raises(ValueError, match=r"loss.pos_weight has 3 values but the model has 1 output channel"):
        build_loss("bce", pos_weight=[1.0, 2.0, 3.0])(logits[:, :1], target.clamp_max(1))
    with pytest.raises(TypeError, match="integer class-index mask"):
        build_loss("mse")(logits, target.float())
    with pytest.raises(UnknownNameError, match="loss=focall: unknown loss; known: .*Did you mean loss=focal"):
        build_loss("focall")
    with pytest.raises(ValueError, match=r"loss.gama: not a parameter of loss=focal"):
        build_loss("focal", gama=2.0)
    with pytest.raises(ValueError, match=r"loss.reduction: 'avg' is not one of mean, sum, none"):
        build_loss("ce", reduction="avg")
    with pytest.raises(ValueError, match=r"loss.weight: auto needs the per-class pixel counts of the training masks"):
        build_loss("ce", weight="auto")
    with pytest.raises(ValueError, match=r"loss.terms.ce.weight: auto needs"):
        build_loss("sum", terms={"ce": {"name": "ce", "weight": "auto"}, "dice": {"name": "dice"}})
    with pytest.raises(ValueError, match=r"loss.weights"):
        build_loss("sum", terms={"ce": {"name": "ce"}, "dice": {"name": "dice"}}, weights={"ce": 1.0})
    with pytest.raises(ValueError, match="mix sigmoid and softmax"):
        build_loss("sum", terms={"bce": {"name": "bce"}, "dice": {"name": "dice"}})
    with pytest.raises(ValueError, match=r"loss.alpha: \[0.5, 2.0\] must be in \[0, 1\]"):
        build_loss("focal", activation="sigmoid", alpha=[0.5, 2.0])
    sum_loss = build_loss("sum", terms={"ce": {"name": "ce", "weight": [1.0, 1.0]}, "dice": {"name": "dice"}})
    with pytest.raises(ValueError, match=r"loss.terms.ce.weight has 2 values"):
        sum_loss(logits, target)


@pytest.mark.parametrize("size_average,reduce", list(itertools.product([None, True, False], repeat=2)))
def test_legacy_reduction_keys_translate_like_torch(size_average, reduce):
    params = {key: value for key, value in {"size_average": size_average, "reduce": reduce}.items() if value is not None}
    if not params:
        return
    with pytest.warns(UserWarning, match="deprecated.*loss.reduction="):
        loss = build_loss("ce", reduction="sum", **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = legacy_get_string(size_average, reduce)
    assert loss.reduction == expected


# --- auto parameters, sigmoid attribute, terms ---------------------------------------


def test_resolve_auto():
    counts = torch.tensor([600, 300, 100])
    resolved = resolve_auto({"name": "ce", "weight": "auto", "ignore_index": None}, counts, 3)
    # frequencies 0.6, 0.3, 0.1; median 0.3 -> the rare class 3, the others 1 (none weighted down)
    assert resolved["weight"] == pytest.approx([1.0, 1.0, 3.0])
    assert resolve_auto({"name": "nll", "weight": "auto"}, counts, 3)["weight"] == pytest.approx([1.0, 1.0, 3.0])
    assert resolve_auto({"name": "bce", "pos_weight": "auto"}, torch.tensor([900, 100]), 2)["pos_weight"] == [9.0]
    multi = resolve_auto({"name": "bce", "pos_weight": "auto"}, counts, 3)["pos_weight"]
    assert multi == pytest.approx([400 / 600, 700 / 300, 900 / 100])
    assert resolve_auto({"name": "focal", "alpha": "auto", "activation": "sigmoid"}, torch.tensor([900, 100]), 2)["alpha"] == [0.9]
    assert resolve_auto({"name": "focal", "alpha": "auto"}, counts, 3)["alpha"] == pytest.approx([0.5, 1.0, 3.0]), "median-frequency"
    nested = {"name": "sum", "terms": {"ce": {"name": "ce", "weight": "auto"}, "dice": {"name": "dice"}},
              "weights": {"ce": 1.0, "dice": 1.0}}
    resolved = resolve_auto(OmegaConf.create(nested), counts, 3)
    assert resolved["terms"]["ce"]["weight"] == pytest.approx([1.0, 1.0, 3.0])
    assert nested["terms"]["ce"]["weight"] == "auto"  # the input is left alone
    build_loss(**resolved)(*make_input((1, 3, 2, 2), classes=3))
    with pytest.raises(ValueError, match="loss.reduction: auto is not supported"):
        resolve_auto({"name": "ce", "reduction": "auto"}, counts, 3)


def test_sigmoid_attribute_and_output_channels():
    expected = {"ce": False, "nll": False, "bce": True, "focal": False, "dice": False, "mse": False}
    for name, sigmoid in expected.items():
        assert build_loss(name).sigmoid is sigmoid
    for name in ["focal", "dice", "mse", "l1", "smooth_l1", "huber"]:
        assert build_loss(name, activation="sigmoid").sigmoid is True
        assert LOSSES.get(name).uses_sigmoid({"activation": "sigmoid"}) is True


def test_loss_terms():
    logits, target = make_input((2, 3, 4, 4), ignore=True)
    ce = build_loss("ce", ignore_index=IGNORE)
    total, terms = loss_terms(ce, logits, target)
    assert list(terms) == ["ce"] and torch.equal(terms["ce"], total.detach())
    summed = build_loss("sum", terms={"ce": {"name": "ce", "ignore_index": IGNORE}, "dice": {"name": "dice", "ignore_index": IGNORE}},
                        weights={"ce": 1.0, "dice": 0.5})
    total, terms = loss_terms(summed, logits, target)
    dice = build_loss("dice", ignore_index=IGNORE)(logits, target)
    torch.testing.assert_close(terms["ce"], ce(logits, target).detach())
    torch.testing.assert_close(terms["dice"], 0.5 * dice.detach())
    torch.testing.assert_close(total, summed(logits, target))
    assert total.requires_grad


# --- every registered loss, from its YAML file ---------------------------------------


def loss_config(path: Path, ignore_index: int | None) -> dict:
    """configs/loss/<name>.yaml with dataset.ignore_index given to it as the builder does."""
    return with_ignore_index(OmegaConf.to_container(OmegaConf.load(path), resolve=True), ignore_index)


def with_auto_resolved(params: dict, num_classes: int) -> dict:
    """``auto`` parameters (the ce default's weight) replaced as the builder does, from made-up pixel counts."""
    return resolve_auto(params, torch.arange(1, num_classes + 1) * 100, num_classes)


def forward_backward_with_ignored_pixels(params: dict, num_classes: int, spatial: tuple[int, ...]) -> None:
    loss_fn = build_loss(**with_auto_resolved(params, num_classes))
    channels = 1 if loss_fn.sigmoid and num_classes == 2 else num_classes
    logits, target = make_input((2, channels, *spatial), classes=num_classes, seed=3)
    target.view(-1)[::3] = IGNORE
    total, terms = loss_terms(loss_fn, logits, target)
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(t) for t in terms.values())
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    assert (logits.grad[ignored] == 0).all(), "ignored pixels must get no gradient"
    assert logits.grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_from_its_yaml(name):
    path = LOSS_CONFIGS / f"{name}.yaml"
    assert path.exists(), f"registered loss {name!r} has no configs/loss/{name}.yaml"
    params = loss_config(path, IGNORE)
    assert params["name"] == name
    for num_classes, spatial in itertools.product([2, 4], [(5, 6), (3, 4, 5)]):
        forward_backward_with_ignored_pixels(params, num_classes, spatial)
    build_loss(**with_auto_resolved(loss_config(path, None), 3))  # dataset.ignore_index: null


@pytest.mark.parametrize("path", sorted(LOSS_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_loss_yaml_builds_and_runs(path):
    params = loss_config(path, IGNORE)
    assert params["name"] in LOSSES, f"{path.name}: name {params['name']!r} is not a registered loss"
    forward_backward_with_ignored_pixels(params, 3, (4, 4))


@pytest.mark.parametrize("name", sorted(path.stem for path in LOSS_CONFIGS.glob("*.yaml")))
def test_hydra_selects_each_loss_file(name):
    if not (REPO / "configs" / "train.yaml").exists():
        pytest.skip("configs/train.yaml is not there to compose with")
    from hydra import compose, initialize_config_dir

    overrides = [f"loss={name}", "dataset.ignore_index=255"]
    if name == "ce_dice":
        overrides.append("loss.weights.dice=0.5")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    params = with_ignore_index(OmegaConf.to_container(cfg.loss, resolve=True), cfg.dataset.ignore_index)
    loss_fn = build_loss(**with_auto_resolved(params, cfg.dataset.num_classes))
    assert loss_fn.ignore_index == 255
    if name == "ce_dice":
        assert loss_fn.weights == {"ce": 1.0, "dice": 0.5}
        assert all(part.ignore_index == 255 for part in loss_fn.parts.values())


def test_benchmark_smoke():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "losses.py"), "--smoke"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "segtrain focal (softmax)" in result.stdout and "F.cross_entropy" in result.stdout


def test_ignore_index_is_set_once_on_the_dataset():
    """The loss files hold no ignore_index: the builder gives every loss (and term) dataset.ignore_index,
    and a loss config that names another value is refused with both keys."""
    assert not any("ignore_index:" in path.read_text().split("#")[0] for path in LOSS_CONFIGS.glob("*.yaml"))
    terms = {"name": "sum", "terms": {"ce": {"name": "ce"}, "dice": {"name": "dice"}}}
    assert with_ignore_index(terms, 255)["terms"]["dice"]["ignore_index"] == 255
    assert with_ignore_index({"name": "ce", "ignore_index": 255}, 255)["ignore_index"] == 255  # the same value: kept
    with pytest.raises(LossParamError, match=r"loss.terms.ce.ignore_index: 3 differs from dataset.ignore_index=255"):
        with_ignore_index({"name": "sum", "terms": {"ce": {"name": "ce", "ignore_index": 3}}}, 255)
