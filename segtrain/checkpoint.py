"""Checkpoints: plain data only (tensors, numbers, strings, the resolved config), written atomically."""
from __future__ import annotations

import logging
import errno
import fcntl
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segtrain.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers (no ``module.``/``_orig_mod.`` prefixes)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a kill at any moment leaves the previous file intact.

    Temporary files that killed saves of ``path`` left behind are removed first. A full disk or a
    dir that cannot be written is a :class:`TrainingError` saying so (the previous file is intact).
    """
    path = Path(path)
    remove_stale_temporaries(path)
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise save_error(path, error) or error from None
    try:
        with os.fdopen(handle, "wb") as file:
            # Held while writing: remove_stale_temporaries leaves a file alone while its writer lives.
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
            os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        # torch.save reports a failed write as a RuntimeError whose context is the OSError.
        readable = save_error(path, os_error_of(error)) if isinstance(error, Exception) else None
        if readable is not None:
            raise readable from None
        raise


def load_checkpoint(path: Path, key: str | None = None) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: a file that needs arbitrary pickled objects is refused.

    A missing, truncated or corrupt file, or one that is no checkpoint (an image, a text file, a bare
    state_dict) is a :class:`ConfigError` naming the file (as ``key=path`` when ``key`` is given) and the fix.
    """
    path = Path(path)
    where = f"{key}={path}" if key else str(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad content
        raise ConfigError(unreadable_checkpoint_message(path, where, key, error)) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(
            f"{where}: holds a {type(checkpoint).__name__}, not a segtrain checkpoint (a dict with the model weights, "
            "optimizer, state and config that train.py writes as last.pt and best.pt)"
        )
    if "model" not in checkpoint and checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise ConfigError(
            f"{where}: a bare state_dict ({len(checkpoint)} tensors), not a segtrain checkpoint; to start from these weights "
            "save them as torch.save({'model': state_dict}, 'weights.pt') and give model.init_from=weights.pt"
        )
    return checkpoint


# ------------------------------------------------------------------ the format
# A checkpoint is a dict of plain data; these functions are the only readers and writers of its keys:
#   model      the weights (``state_dict`` of the plain module, no DDP/compile prefixes)
#   optimizer, scheduler, scaler   their ``state_dict``s (to resume exactly)
#   state      the trainer's TrainState as a dict (epoch, batch, step, best, history, ...)
#   rng        Python, numpy, torch and CUDA generator states
#   config     the resolved run config (``auto`` values filled in): what eval/predict/export rebuild


def training_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, state: dict[str, Any], config: dict[str, Any]
) -> dict[str, Any]:
    """What ``last.pt`` and ``best.pt`` hold."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "state": state,
        "rng": rng_state(),
        "config": config,
    }


def restore_training(
    checkpoint: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
) -> dict[str, Any]:
    """Load everything ``training_checkpoint`` saved into the built objects (weights strictly) and
    set the RNGs; returns the trainer state to continue from."""
    load_model_state(unwrap(model), checkpoint["model"], strict=True)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    return dict(checkpoint["state"])


def load_weights(model: nn.Module, checkpoint: dict[str, Any], strict: bool = True) -> list[str]:
    """The checkpoint's weights into ``model`` (eval, predict, export; ``init_from`` with ``strict=False``)."""
    return load_model_state(unwrap(model), checkpoint["model"], strict=strict)


def init_weights_from(model: nn.Module, path: Path, strict: bool) -> None:
    """``model.init_from``: start from a checkpoint's weights (fine-tuning); ``strict=False`` loads the
    layers whose names and shapes match and logs the others."""
    skipped = load_weights(model, load_checkpoint(path, "model.init_from"), strict=strict)
    log.info("model.init_from=%s: loaded weights%s", path, f"; not loaded: {', '.join(skipped)}" if skipped else "")


def weights_in(loaded: Any) -> Any:
    """The weights of a segtrain checkpoint, or ``loaded`` itself (a bare state_dict from elsewhere)."""
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        return loaded["model"]
    return loaded


def stored_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The trainer state saved with the checkpoint (epoch, step, best mIoU, history)."""
    return checkpoint.get("state", {})


def stored_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The resolved run config saved with the checkpoint. Checkpoints written before 2026-12-03
    also stored ``model.num_classes`` (the builder gives the model its output channels): dropped."""
    config = dict(checkpoint["config"])
    if isinstance(config.get("model"), dict):
        config["model"] = {key: value for key, value in config["model"].items() if key != "num_classes"}
    return config


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
        raise ConfigError(
            "the checkpoint does not fit this model (another architecture or class count?): " + "; ".join(problems)
        )
    matching = {key: value for key, value in state_dict.items() if key in own and value.shape == own[key].shape}
    model.load_state_dict(matching, strict=False)
    return missing + unexpected + [shape.split(":")[0] for shape in shapes]


def _few(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --- readable failures of save_checkpoint and load_checkpoint ------------------------------

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the ``.<name>.*.tmp`` files of earlier saves of ``path`` that no live writer holds
    (a save killed mid-write); returns them."""
    removed = []
    for temporary in Path(path).parent.glob(f".{path.name}.*.tmp"):
        try:
            descriptor = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a save writes it
            temporary.unlink(missing_ok=True)
            removed.append(temporary)
        except OSError:
            pass
        finally:
            os.close(descriptor)
    if removed:
        log.info("removed %d temporary files of an interrupted save: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (itself, or its cause or context), if any."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def save_error(path: Path, error: OSError | None) -> TrainingError | None:
    """A one-line TrainingError for a full disk or a dir that cannot be written; None for other errors."""
    if error is None or error.errno not in NO_SPACE + NOT_WRITABLE:
        return None
    previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
    if error.errno in NO_SPACE:
        return TrainingError(
            f"no space left on device while writing {path}; {previous}. Free space on that disk "
            f"(or move the run dir to a larger one), then continue with resume={path.parent}"
        )
    return TrainingError(
        f"cannot write {path} ({error.strerror}): the run dir {path.parent} is read-only or not yours; {previous}. "
        "Train into a folder you can write (hydra.run.dir=...); to continue this run, copy its dir there and resume from the copy"
    )


def unreadable_checkpoint_message(path: Path, where: str, key: str | None, error: Exception) -> str:
    """Why torch.load could not read ``path``, in one line, with the fix."""
    if isinstance(error, FileNotFoundError):
        return f"{where}: no such file"
    if isinstance(error, IsADirectoryError):
        return f"{where}: a folder; give a checkpoint file (last.pt or best.pt of a run dir)"
    if isinstance(error, PermissionError):
        return f"{where}: cannot read it ({error.strerror})"
    try:
        with open(path, "rb") as file:
            head = file.read(16)
        size = path.stat().st_size
    except OSError as read_error:
        return f"{where}: cannot read it ({read_error.strerror or read_error})"
    kind = _file_kind(head)
    if kind in ("zip", "pickle") and size and isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        return (
            f"{where}: not a plain-data checkpoint (torch.load(weights_only=True) refused it: it pickles "
            f"{found.group(1) if found else 'objects other than tensors and plain data'}); "
            "segtrain only loads checkpoints of tensors, numbers, strings and configs"
        )
    if size == 0 or kind in ("zip", "pickle"):
        return f"{where}: the file is truncated or corrupt ({size} bytes; {_first_sentence(error)}){_intact_sibling(path, key)}"
    return (
        f"{where}: not a PyTorch checkpoint but {kind}; give a checkpoint that train.py wrote (last.pt or best.pt "
        "of a run dir, or the run dir itself for resume=)"
    )


def _file_kind(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "zip"  # torch.save's format
    if head.startswith(b"\x80"):
        return "pickle"  # torch.save's legacy format
    for magic, kind in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"II*\x00", "a TIFF image"),
                        (b"MM\x00*", "a TIFF image"), (b"BM", "a BMP image"), (b"\x93NUMPY", "a numpy .npy file"),
                        (b"\x1f\x8b", "a gzip file"), (b"\x89HDF", "an HDF5 file"), (b"\x08", "possibly an ONNX or protobuf file")):
        if head.startswith(magic):
            return kind
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "a file of another format"


def _first_sentence(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0][:160]


def _intact_sibling(path: Path, key: str | None) -> str:
    """``; <dir>/best.pt looks intact: resume=<it>`` for another checkpoint of the run dir that is a whole file."""
    for name in ("best.pt", "last.pt"):
        other = path.parent / name
        if other.name != path.name and other.is_file() and zipfile.is_zipfile(other):
            return f"; {other} looks intact: {key or 'resume'}={other}"
    return f"; no other whole checkpoint in {path.parent}"
