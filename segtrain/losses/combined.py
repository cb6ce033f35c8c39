"""Weighted sums of losses (``ce_dice`` = CE 1.0 + Dice 1.0, the nnU-Net default)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from segtrain.losses.base import SegLoss, register_loss
from segtrain.errors import LossParamError
from segtrain.losses.build import as_containers, build_loss_at, weighted_terms
from segtrain.losses.target import PreparedTarget
from segtrain.registry import LOSSES


@register_loss("sum")
class WeightedSumLoss(SegLoss):
    """``sum_k weights[k] * terms[k](logits, target)``.

    ``terms`` maps a term name to a loss config (with its own ``name``); ``weights``
    maps the same names to floats (default 1.0 each). The target is checked once for
    all terms, so the terms must agree on ``ignore_index`` and on sigmoid vs softmax
    (the model's output channels must suit every term), and each must reduce to a
    scalar (``reduction`` mean or sum).
    """

    def __init__(self, terms: Mapping[str, Mapping[str, Any]], weights: Mapping[str, float] | None = None) -> None:
        terms, weights = as_containers(terms), as_containers(weights)
        if not isinstance(terms, dict) or not terms:
            raise LossParamError("loss.terms", "give at least one term, e.g. {ce: {name: ce}, dice: {name: dice}}")
        parts: dict[str, SegLoss] = {}
        for term, params in terms.items():
            if not isinstance(params, dict) or "name" not in params:
                raise LossParamError(f"loss.terms.{term}", f"{params!r} must be a loss config with a name, e.g. {{name: ce}}")
            params = dict(params)
            parts[term] = build_loss_at(params.pop("name"), params, f"loss.terms.{term}")
            if parts[term].reduction == "none":
                raise LossParamError(f"loss.terms.{term}.reduction", "none: a term of a sum must reduce to a scalar (mean or sum)")
        weights = {term: 1.0 for term in terms} if weights is None else weights
        if not isinstance(weights, dict) or set(weights) != set(terms):
            raise LossParamError(
                "loss.weights", f"{weights!r} must give one float per term of loss.terms ({', '.join(terms)})"
            )
        for term, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise LossParamError(f"loss.weights.{term}", f"{weight!r} is not a number")
        ignore_indices = {part.ignore_index for part in parts.values()}
        if len(ignore_indices) > 1:
            raise LossParamError(
                "loss.terms", f"the terms ignore different values {sorted(map(str, ignore_indices))}; leave ignore_index "
                "out of the terms: the framework gives each dataset.ignore_index"
            )
        sigmoids = {term: part.sigmoid for term, part in parts.items()}
        if len(set(sigmoids.values())) > 1:
            raise LossParamError(
                "loss.terms", f"terms mix sigmoid and softmax losses ({sigmoids}); the model's output channels "
                "must suit every term, so use one kind (e.g. bce + dice with activation=sigmoid)"
            )
        super().__init__(ignore_indices.pop(), "mean")
        self.parts = nn.ModuleDict(parts)
        self.weights = {term: float(weight) for term, weight in weights.items()}
        self.sigmoid = next(iter(sigmoids.values()))
        self.softmax = any(part.softmax for part in parts.values())

    @classmethod
    def uses_sigmoid(cls, params: dict[str, Any]) -> bool:
        terms = params.get("terms") or {}
        return any(
            isinstance(term, dict) and term.get("name") in LOSSES and LOSSES.get(term["name"]).uses_sigmoid(term)
            for term in terms.values()
        )

    def weighted_terms(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Each term times its weight, the target checked once."""
        return self.weighted_terms_prepared(logits, self.prepare(logits, target))

    def weighted_terms_prepared(self, logits: Tensor, target: PreparedTarget) -> dict[str, Tensor]:
        return {term: self.weights[term] * part.compute_prepared(logits, target) for term, part in self.parts.items()}

    def compute_prepared(self, logits: Tensor, target: PreparedTarget) -> Tensor:
        return sum(self.weighted_terms_prepared(logits, target).values())

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


class AuxiliaryHeadLoss(nn.Module):
    """The loss of a model with an auxiliary head (torchvision's FCN and DeepLabV3 in train mode
    return ``{"out", "aux"}``): ``loss(out) + weight * loss(aux)``, the weighted aux term named
    ``aux``. Logits alone (eval mode) give ``loss(logits)``.

    The weight is a loss setting (``model.aux_weight`` in the config, next to ``model.aux_loss``
    that adds the head); the builder wraps the run's loss in this when the model has the head.
    """

    def __init__(self, loss: nn.Module, weight: float) -> None:
        super().__init__()
        self.loss, self.weight = loss, float(weight)
        self.sigmoid = getattr(loss, "sigmoid", False)

    def weighted_terms(self, outputs: Tensor | dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        if not isinstance(outputs, dict):
            return weighted_terms(self.loss, outputs, target)
        terms = weighted_terms(self.loss, outputs["out"], target)
        return {**terms, "aux": self.weight * self.loss(outputs["aux"], target)}

    def forward(self, outputs: Tensor | dict[str, Tensor], target: Tensor) -> Tensor:
        return sum(self.weighted_terms(outputs, target).values())
