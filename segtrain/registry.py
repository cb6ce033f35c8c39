"""A registry is a dict filled by a decorator (like timm's ``@register_model``).

Models, datasets and losses each have one. Registration happens when
``segtrain`` is imported, so a registered name can never be missing because a
module was not imported.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

from segtrain.errors import UnknownNameError


class Registry:
    """Maps names to classes or factory functions of one kind (``model``, ``loss``...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@LOSSES.register("focal")`` (the name defaults to the object's ``__name__``)."""

        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            key = name or obj.__name__
            if key in self._entries:
                raise KeyError(f"{self.kind} {key!r} is already registered (by {self._entries[key]!r})")
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        """The entry called ``name``; an unknown name raises with the known names and a suggestion."""
        if name not in self._entries:
            raise UnknownNameError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        known = ", ".join(sorted(self._entries))
        message = f"{self.kind}={name}: unknown {self.kind}; known: {known}"
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        if close:
            message += f". Did you mean {self.kind}={close[0]}?"
        return message

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


MODELS = Registry("model")
DATASETS = Registry("dataset")
LOSSES = Registry("loss")
