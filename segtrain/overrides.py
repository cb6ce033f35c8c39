"""Command-line keys checked before Hydra composes them: an unknown key under ``model``,
``dataset``, ``loss`` or ``trainer`` ends with one line naming the closest known key, instead of
Hydra's hint to add a ``+`` (which then fails deep inside the run)."""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

GROUPS = ("model", "dataset", "loss", "trainer")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def split_override(text: str) -> tuple[str, str]:
    """A Hydra override's key (without its ``+``/``++``/``~`` prefix) and value: ``+a.b=1`` -> ``("a.b", "1")``."""
    key, _, value = text.lstrip("+~").partition("=")
    return key, value


def did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def unknown_trainer_keys(keys: Iterable[str]) -> str | None:
    """``trainer.<key>`` that neither ``TrainerSettings`` nor the DDP settings know, with a suggestion."""
    from segtrain.distributed import DISTRIBUTED_KEYS
    from segtrain.trainer import TrainerSettings

    known = [field.name for field in dataclasses.fields(TrainerSettings)] + list(DISTRIBUTED_KEYS)
    for key in keys:
        if key not in known:
            return f"trainer.{key}: unknown key{did_you_mean(key, known).replace('did you mean ', 'did you mean trainer.')}"
    return None


def unknown_key_message(arguments: list[str], config_dir: Path = CONFIGS) -> str | None:
    """The first unknown ``group.key`` among the command line's overrides (``group`` one of
    :data:`GROUPS`), as a one-line message with the closest known key; None when all are known.

    The config is composed with the command line's group choices only (the first of a sweep's
    comma-separated options), so the keys are those of the model, dataset, ... actually chosen.
    """
    overrides = [argument for argument in arguments if "=" in argument and not argument.startswith("-")]
    dotted = [argument.split("=", 1)[0] for argument in overrides if not argument.startswith("~")]
    checked = [key for key in dotted if key.lstrip("+").split(".")[0] in GROUPS and "." in key]
    if not checked:
        return None
    from hydra import compose, initialize_config_dir

    choices = [
        f"{key}={value.split(',')[0]}" for key, value in (argument.split("=", 1) for argument in overrides)
        if "." not in key and not key.startswith(("+", "~")) and (config_dir / key).is_dir()
    ]
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name="train", overrides=choices)
    except HydraException:  # a group option that does not exist (model=unett): Hydra's own message follows
        return None
    for key in checked:
        if key.startswith("+"):  # adding a key: fine for a class's own parameters, not for the trainer's
            parts = key[1:].split(".")
            message = unknown_trainer_keys([parts[1]]) if parts[0] == "trainer" and len(parts) == 2 else None
            if message:
                return message
            continue
        parent, leaf = key.rsplit(".", 1)
        node = OmegaConf.select(cfg, parent)
        if isinstance(node, DictConfig) and leaf not in node.keys():  # not `in node`: False for a ??? (missing) value
            known = [f"{parent}.{name}" for name in node.keys()]
            return f"{key}: unknown key{did_you_mean(key, known)} (keys of {parent}: {', '.join(str(name) for name in node.keys())})"
    return None
