"""Checkpoints: plain data only (tensors, numbers, strings, the resolved config), written atomically."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers (no ``module.``/``_orig_mod.`` prefixes)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a kill at any moment leaves the previous file intact."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: a file that needs arbitrary pickled objects is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises UnpicklingError (and others) for non-plain content
        raise ValueError(
            f"{path}: not a plain-data checkpoint (torch.load(weights_only=True) refused it: {error}). "
            "segtrain only loads checkpoints of tensors, numbers, strings and configs."
        ) from None


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states, as plain data (lists and tensors)."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Load weights, failing with the mismatched keys and shapes rather than a raw traceback.

    ``strict=False`` loads the keys whose names and shapes match and returns the others
    (for fine-tuning from a checkpoint of a related model).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
        for key in set(own) & set(state_dict)
        if state_dict[key].shape != own[key].shape
    )
    problems = [f"missing from the checkpoint: {_few(missing)}"] * bool(missing)
    problems += [f"not in the model: {_few(unexpected)}"] * bool(unexpected)
    problems += [f"different shapes: {_few(shapes)}"] * bool(shapes)
    if problems and strict:
        raise ValueError(
            "the checkpoint does not fit this model (another architecture or class count?): " + "; ".join(problems)
        )
    matching = {key: value for key, value in state_dict.items() if key in own and value.shape == own[key].shape}
    model.load_state_dict(matching, strict=False)
    return missing + unexpected + [shape.split(":")[0] for shape in shapes]


def _few(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
