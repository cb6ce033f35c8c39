"""Turning a loss config into a module, resolving ``auto`` parameters, and naming loss terms."""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn._reduction import legacy_get_string

from segtrain.losses.base import SegLoss
from segtrain.errors import LossParamError
from segtrain.registry import LOSSES
from segtrain.task import output_channels


def as_containers(value: Any) -> Any:
    """Config values as plain dicts and lists (OmegaConf containers included)."""
    if isinstance(value, Mapping):
        return {str(key): as_containers(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [as_containers(item) for item in value]
    return value


def build_loss(name: str, **params: Any) -> nn.Module:
    """The loss registered as ``name``, built from the parameters of its config file.

    ``build_loss(**cfg.loss)`` works, since the file's first key is ``name``. The legacy
    torch keys ``size_average``/``reduce`` are translated to ``reduction`` exactly as
    ``torch.nn._reduction.legacy_get_string`` does (and override ``reduction``, as in
    torch), with a warning. ``auto`` values must be resolved first (:func:`resolve_auto`).
    """
    return build_loss_at(name, as_containers(params), "loss")


def build_loss_at(name: str, params: dict[str, Any], key: str) -> SegLoss:
    """:func:`build_loss` for the config node at ``key`` (``loss`` or ``loss.terms.<term>``), named in errors."""
    cls = LOSSES.get(name)
    if "size_average" in params or "reduce" in params:
        reduction = legacy_get_string(params.pop("size_average", None), params.pop("reduce", None), emit_warning=False)
        warnings.warn(
            f"{key}.size_average and {key}.reduce are deprecated (as in torch); they were translated to "
            f"{key}.reduction={reduction} (overriding any {key}.reduction); set {key}.reduction instead",
            UserWarning,  # like torch: a DeprecationWarning would be hidden from a training run's log
            stacklevel=3,
        )
        params["reduction"] = reduction
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for param in params:
        if param not in accepted:
            raise LossParamError(
                f"{key}.{param}", f"not a parameter of loss={name}; its parameters are: {', '.join(accepted)}"
            )
    try:
        loss = cls(**params)
    except LossParamError as error:
        raise (error.under(key) if key != "loss" else error) from None
    loss.config_key = key
    return loss


def loss_terms(loss_fn: nn.Module, outputs: Tensor | dict[str, Tensor], target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The total loss (to call ``backward`` on) and its named, weighted terms (detached, for logging).

    A weighted sum gives one entry per term (``{"ce": 1.0 * ce, "dice": 1.0 * dice}``), an
    auxiliary-head loss adds ``aux``; any other loss gives ``{name: total}``. Training and
    validation both compute their loss here.
    """
    terms = weighted_terms(loss_fn, outputs, target)
    total = sum(terms.values())
    return total, {name: value.detach() for name, value in terms.items()}


def weighted_terms(loss_fn: nn.Module, outputs: Tensor | dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
    """The weighted terms of ``loss_fn`` (not detached); ``{name: loss}`` for a loss of one term."""
    method = getattr(loss_fn, "weighted_terms", None)
    if method is not None:
        return method(outputs, target)
    return {getattr(loss_fn, "name", type(loss_fn).__name__): loss_fn(outputs, target)}


def with_ignore_index(params: Mapping[str, Any], ignore_index: int | None, key: str = "loss") -> dict[str, Any]:
    """The loss config with ``dataset.ignore_index`` given to every loss that takes one (the terms
    of a sum too): the dataset's config is the one place it is set, for the losses and the metrics.

    A loss config that sets a different ``ignore_index`` is refused, naming both keys.
    """
    resolved = as_containers(params)
    cls = LOSSES.get(resolved["name"]) if "name" in resolved else None
    if isinstance(resolved.get("terms"), dict):
        resolved["terms"] = {
            term: with_ignore_index(term_params, ignore_index, f"{key}.terms.{term}") if isinstance(term_params, dict) else term_params
            for term, term_params in resolved["terms"].items()
        }
    if cls is None or "ignore_index" not in inspect.signature(cls.__init__).parameters:
        return resolved
    given = resolved.get("ignore_index", ignore_index)
    if given != ignore_index:
        raise LossParamError(
            f"{key}.ignore_index",
            f"{given} differs from dataset.ignore_index={ignore_index}; the loss and the metrics take the dataset's value: "
            f"set dataset.ignore_index={given} and remove {key}.ignore_index",
        )
    resolved["ignore_index"] = ignore_index
    return resolved


def median_frequency_weights(class_pixel_counts: Tensor, binary: bool, sigmoid: bool) -> list[float]:
    """Median-frequency balancing (Eigen & Fergus 2015): ``median(freq) / freq_c`` with
    ``freq_c`` the share of class c among all counted training pixels (a simplification:
    the paper counts only images where c occurs). A class absent from the masks gets 1."""
    frequency = class_pixel_counts / class_pixel_counts.sum()
    present = class_pixel_counts > 0
    median = torch.quantile(frequency[present], 0.5)
    weights = torch.where(present, median / frequency.clamp_min(1e-300), torch.ones_like(frequency))
    return [round(float(w), 6) for w in weights]


def rare_class_weights(class_pixel_counts: Tensor, binary: bool, sigmoid: bool) -> list[float]:
    """CE/NLL ``weight=auto``: each class rarer than the median class is weighted up to the median's
    share of the pixels (``median(freq) / freq_c``, as in median-frequency balancing); the others keep
    1, so no class is weighted down. Full median-frequency balancing also weights the common classes
    down (a background at 79 % of the pixels to 0.11), which cost the shapes default 0.13 mIoU;
    this rule left it unchanged and taught a street-like folder set its rare classes
    (benchmarks/README.md, "Rare classes"). A class absent from the masks gets 1."""
    return [max(1.0, weight) for weight in median_frequency_weights(class_pixel_counts, binary, sigmoid)]


def negatives_over_positives(class_pixel_counts: Tensor, binary: bool, sigmoid: bool) -> list[float]:
    """BCE ``pos_weight``: negatives / positives per output channel. Binary (1 channel):
    class-0 over class-1 pixels; multi-label: other pixels over class-c pixels. 1 where a
    channel has no positives."""
    total = class_pixel_counts.sum()
    positives = class_pixel_counts[1:2] if binary else class_pixel_counts
    ratios = torch.where(positives > 0, (total - positives) / positives.clamp_min(1), torch.ones_like(positives))
    return [round(float(r), 6) for r in ratios]


def focal_alpha(class_pixel_counts: Tensor, binary: bool, sigmoid: bool) -> list[float]:
    """Focal ``alpha``: softmax form, median-frequency weights; sigmoid form, the share of
    negatives per channel, so ``alpha * positives == (1 - alpha) * negatives``."""
    if not sigmoid:
        return median_frequency_weights(class_pixel_counts, binary, sigmoid)
    total = class_pixel_counts.sum()
    positives = class_pixel_counts[1:2] if binary else class_pixel_counts
    return [round(float(a), 6) for a in (total - positives) / total]


# (loss name, parameter) -> the rule that replaces ``auto`` from the class pixel counts.
AUTO_PARAMS: dict[tuple[str, str], Callable[[Tensor, bool, bool], list[float]]] = {
    ("ce", "weight"): rare_class_weights,
    ("nll", "weight"): rare_class_weights,
    ("bce", "pos_weight"): negatives_over_positives,
    ("focal", "alpha"): focal_alpha,
}


def resolve_auto(params: Mapping[str, Any], class_pixel_counts: Tensor, num_classes: int) -> dict[str, Any]:
    """``params`` (a loss config, ``name`` included) with every ``auto`` replaced by a list of floats.

    ``class_pixel_counts`` is the int64 count of each class over the training masks
    (ignored pixels left out). Rules (:data:`AUTO_PARAMS`): ``ce``/``nll`` ``weight``:
    classes rarer than the median up-weighted to its share, the others 1; ``bce``
    ``pos_weight``: negatives / positives per output channel; ``focal`` ``alpha``:
    median-frequency (softmax) or the share of negatives (sigmoid). A sigmoid loss on a two-class dataset has one output channel, so its list
    has one value (for class 1). Terms of a weighted sum are resolved the same way.
    """
    counts = torch.as_tensor(class_pixel_counts).reshape(-1).double()
    if counts.numel() != num_classes:
        raise ValueError(
            f"resolve_auto: {counts.numel()} class pixel counts for dataset.num_classes={num_classes}"
        )
    if counts.sum() <= 0:
        raise ValueError("loss parameters set to auto need labelled training pixels, but the masks have none")
    return _resolve(as_containers(params), counts, num_classes, "loss")


def _resolve(params: dict[str, Any], counts: Tensor, num_classes: int, key: str) -> dict[str, Any]:
    name = params.get("name")
    if name is None:
        raise LossParamError(f"{key}.name", "missing: every loss config names its loss")
    cls = LOSSES.get(name)
    resolved = dict(params)
    if isinstance(params.get("terms"), dict):
        resolved["terms"] = {
            term: _resolve(term_params, counts, num_classes, f"{key}.terms.{term}")
            for term, term_params in params["terms"].items()
        }
    sigmoid = cls.uses_sigmoid(params)
    binary = output_channels(num_classes, sigmoid) == 1
    for param, value in params.items():
        if value != "auto":
            continue
        rule = AUTO_PARAMS.get((name, param))
        if rule is None:
            supported = ", ".join(f"{loss}.{p}" for loss, p in AUTO_PARAMS)
            raise LossParamError(f"{key}.{param}", f"auto is not supported here; it is for: {supported}")
        resolved[param] = rule(counts, binary, sigmoid)
    return resolved
