"""``mode=export``: a checkpoint's model as ONNX (``model.onnx``) and a ``torch.export`` program
(``model.pt2``), with ``export.json`` describing what a deployment needs, checked against the
model in PyTorch before it reports success.

The model is rebuilt from the config stored in the checkpoint (not from the command line's),
on the CPU in float32. The check runs validation samples resized to the training size and to
one other size through onnxruntime and through the ``.pt2`` program, and compares their
logits with PyTorch's: the largest absolute difference (goal <= 1e-4) and the share of pixels
whose predicted class agrees (goal >= 99.9 %). The difference goal scales with the logits
(``1e-4 x max(1, max |logit|)``): float32 sums taken in another order differ by a few units
in the last place, which for an untrained network's logits of several hundred is above 1e-4.
"""
from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from segtrain.build import Components
from segtrain.checkpoint import stored_state
from segtrain.errors import ConfigError, ExportError
from segtrain.task import classes_from_logits
from segtrain.visualize import resolve_palette

log = logging.getLogger(__name__)

MAX_DIFF_GOAL, AGREEMENT_GOAL = 1e-4, 0.999
EXTRA = ("onnx", "onnxscript", "onnxruntime")


def export_checkpoint(cfg: DictConfig, model_from_checkpoint: Callable[[DictConfig], Any]) -> float:
    """``mode=export resume=<checkpoint or run dir>``; returns the smallest argmax agreement of the check.

    ``model_from_checkpoint`` rebuilds the checkpoint's run (``segtrain.run.model_from_checkpoint``,
    passed in by ``run.main``: export sits below run and does not import it)."""
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"mode=export needs {', '.join(missing)}: install the export extra, pip install -e '.[export]' "
            "(onnx, onnxscript, onnxruntime)"
        )
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.device_list = []  # export and check on the CPU, in float32
    loaded = model_from_checkpoint(cfg)
    components, path, checkpoint, run_cfg = loaded.components, loaded.path, loaded.checkpoint, loaded.config
    model = components.model.eval()
    export_cfg = cfg.get("export") or {}
    output = Path(export_cfg.get("output") or path.parent / "export")
    output.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s (%s) into %s", path, run_cfg.model.get("name", run_cfg.model.get("_target_")), output)

    samples = validation_samples(components, int(export_cfg.get("samples", 2)))
    train_size = spatial_size(run_cfg.dataset.get("size"), samples.dim() - 2, samples.shape[2:])
    program, axes = export_program(model, resize(samples, train_size), run_cfg)
    torch.export.save(program, output / "model.pt2")
    write_onnx(program, output / "model.onnx", run_cfg)
    sizes = [train_size] + ([other_size(train_size)] if axes["spatial_dynamic"] else [])
    rows = check(model, output, [resize(samples, size) for size in sizes])
    description = describe(run_cfg, components, checkpoint, path, train_size, axes, rows)
    (output / "export.json").write_text(json.dumps(description, indent=2) + "\n")
    print(format_rows(rows))
    failed = [row for row in rows if not passes(row)]
    if failed:
        raise ExportError(
            f"the exported model does not compute what the checkpoint's model does: {format_rows(failed)}; "
            f"goals: max |logit difference| <= {MAX_DIFF_GOAL} x max(1, max |logit|), argmax agreement >= {AGREEMENT_GOAL:.1%} "
            f"(details in {output / 'export.json'})"
        )
    log.info("export checked: %s, %s and export.json in %s", "model.onnx", "model.pt2", output)
    return min(row["argmax_agreement"] for row in rows)


def validation_samples(components: Components, count: int) -> torch.Tensor:
    """The first ``count`` validation images, resized to the first one's size, as one float32 batch."""
    dataset = components.val_loader.dataset
    images = [torch.as_tensor(dataset[index][0]).float() for index in range(min(max(count, 1), len(dataset)))]
    return torch.stack([resize(image[None], images[0].shape[1:])[0] for image in images])


def spatial_size(configured: Any, dims: int, fallback: tuple[int, ...]) -> tuple[int, ...]:
    """``dataset.size`` per axis (an int for every axis), or the samples' own size without one."""
    if configured is None:
        return tuple(int(size) for size in fallback)
    if isinstance(configured, int):
        return (int(configured),) * dims
    return tuple(int(size) for size in configured)


def other_size(size: tuple[int, ...]) -> tuple[int, ...]:
    """A second size for the check, 1.5x the training size: not the size the program was traced at."""
    return tuple(side * 3 // 2 for side in size)


def resize(images: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(images.shape[2:]) == tuple(size):
        return images
    mode = "bilinear" if images.dim() == 4 else "trilinear"
    return F.interpolate(images, size=size, mode=mode, align_corners=False)


def export_program(model: nn.Module, example: torch.Tensor, run_cfg: DictConfig) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """``torch.export`` with the batch and spatial axes dynamic where the model allows; which axes
    stayed fixed (and why) is logged and returned."""
    spatial = range(2, example.dim())
    attempts = [
        ("batch and spatial sizes dynamic", {0: torch.export.Dim("batch", min=1), **{axis: torch.export.Dim.AUTO for axis in spatial}}),
        ("batch size dynamic, spatial sizes fixed", {0: torch.export.Dim("batch", min=1)}),
        ("all sizes fixed", None),
    ]
    errors = []
    for label, shapes in attempts:
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=(shapes,) if shapes is not None else None)
        except Exception as error:  # the model pins some axis: try with fewer dynamic axes
            errors.append(f"{label}: {str(error).splitlines()[0][:300]}")
            continue
        user_input = program.graph_signature.user_inputs[0]
        shape = next(node for node in program.graph.nodes if node.name == user_input).meta["val"].shape
        layout = layout_names(example.dim())
        fixed = [f"{name}={int(side)}" for name, side in zip(layout, shape) if isinstance(side, int) and name != "C"]
        if fixed:
            log.warning(
                "model=%s: exported with fixed %s (%s); %s", run_cfg.model.get("name"), ", ".join(fixed), label,
                "; ".join(errors) or "torch.export specialised them",
            )
        bounds = {str(symbol): bound for symbol, bound in program.range_constraints.items()}
        ranges = {  # each dynamic axis's allowed sizes, [lowest, highest] (None: no upper limit)
            name: [int(bounds[str(side)].lower), None if str(bounds[str(side)].upper) in ("int_oo", "oo") else int(bounds[str(side)].upper)]
            for name, side in zip(layout, shape) if not isinstance(side, int) and str(side) in bounds
        }
        shape_text = [name if name in ranges else str(int(side)) for name, side in zip(layout, shape)]
        spatial_dynamic = all(not isinstance(side, int) for side in shape[2:])
        return program, {"shape": shape_text, "fixed": fixed, "ranges": ranges, "spatial_dynamic": spatial_dynamic}
    raise ExportError(f"model={run_cfg.model.get('name')}: torch.export failed: {'; '.join(errors)}")


def layout_names(dims: int) -> list[str]:
    return ["N", "C", "H", "W"] if dims == 4 else ["N", "C", "D", "H", "W"]


def write_onnx(program: torch.export.ExportedProgram, path: Path, run_cfg: DictConfig) -> None:
    """The ONNX file from the exported program; an op ONNX lacks is named with what to do."""
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines (optimizer passes) would fill the run's log
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    except Exception as error:
        text = str(error)
        op = re.search(r"op='([\w.]+)'", text) or re.search(r"(aten::\w+|aten\.\w+(?:\.\w+)?)", text)
        name = op.group(1) if op else "an operator"
        raise ExportError(
            f"model={run_cfg.model.get('name')}: ONNX has no translation for {name}; replace it in the model with "
            "ops ONNX supports, or register a translation (torch.onnx.export(..., custom_translation_table=...)); "
            f"model.pt2 (torch.export) was written beside {path.name}"
        ) from None
    onnx_program.save(str(path))


def check(model: nn.Module, output: Path, batches: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Logits of onnxruntime and of the .pt2 program against PyTorch's, per size."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(output / "model.pt2").module()
    input_name = session.get_inputs()[0].name
    rows = []
    for images in batches:
        with torch.no_grad():
            reference = model(images)
            exported = {"onnxruntime (model.onnx)": torch.from_numpy(session.run(None, {input_name: images.numpy()})[0]),
                        "torch.export (model.pt2)": program(images)}
        for runtime, logits in exported.items():
            rows.append({
                "runtime": runtime, "input": list(images.shape),
                "max_abs_diff": float((logits - reference).abs().max()),
                "max_abs_logit": float(reference.abs().max()),
                "argmax_agreement": float((classes_from_logits(logits) == classes_from_logits(reference)).float().mean()),
            })
    return rows


def passes(row: dict[str, Any]) -> bool:
    return row["max_abs_diff"] <= MAX_DIFF_GOAL * max(1.0, row["max_abs_logit"]) and row["argmax_agreement"] >= AGREEMENT_GOAL


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'runtime':<26} {'input':<22} {'max |diff|':>11} {'max |logit|':>12} {'argmax agreement':>17}"]
    lines += [
        f"{row['runtime']:<26} {str(tuple(row['input'])):<22} {row['max_abs_diff']:>11.2e} {row['max_abs_logit']:>12.3g} "
        f"{row['argmax_agreement']:>16.4%}"
        for row in rows
    ]
    return "\n".join(lines)


def describe(
    run_cfg: DictConfig, components: Components, checkpoint: dict[str, Any], path: Path, train_size: tuple[int, ...],
    axes: dict[str, Any], rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """export.json: everything a deployment needs to feed the model and read its output."""
    dataset_cfg = OmegaConf.to_container(run_cfg.dataset, resolve=True)
    trainer = OmegaConf.to_container(run_cfg.trainer, resolve=True)
    dims = len(train_size)
    state = stored_state(checkpoint)
    best = next((entry for entry in state.get("history", []) if entry.get("epoch") == state.get("best_epoch")), None)
    out_channels = components.out_channels
    sigmoid = out_channels == 1
    return {
        "files": {"onnx": "model.onnx", "torch_export": "model.pt2"},
        "class_names": list(components.class_names),
        "num_classes": components.num_classes,
        "input": {
            "layout": "N, C, H, W" if dims == 2 else "N, C, D, H, W",
            "channels": int(dataset_cfg["in_channels"]),
            "dtype": "float32",
            "scaling": "uint8 values / 255 (uint16 / 65535), to [0, 1]",
            "mean": dataset_cfg.get("mean"),
            "std": dataset_cfg.get("std"),
            "normalise": "(x - mean) / std per channel after the scaling" if dataset_cfg.get("mean") is not None else "none",
            "training_size": list(train_size),
            "shape": axes["shape"],
            "fixed_axes": axes["fixed"],
            "dynamic_ranges": axes["ranges"],
        },
        "output": {
            "kind": "one logit channel; sigmoid(logit) is the probability of class 1" if sigmoid else "logits, one channel per class",
            "channels": out_channels,
            "prediction": "logit > 0 (sigmoid > 0.5) is class 1" if sigmoid else "argmax over the channels",
        },
        "palette": resolve_palette(dataset_cfg.get("palette"), components.val_loader.dataset, components.num_classes).tolist(),
        "inference": {
            "val_mode": trainer.get("val_mode", "whole"),
            "window": trainer.get("window"),
            "stride": trainer.get("stride"),
            "note": "slide: run the model on windows of `window` pixels every `stride` (default window/2) and average overlapping logits",
        },
        "checkpoint": {
            "path": str(path), "epoch": state.get("epoch", 1) - 1, "step": state.get("step"),
            "best_miou": state.get("best_miou"), "best_epoch": state.get("best_epoch"),
            "metrics": best,
        },
        "versions": versions(),
        "check": {
            "max_abs_diff_goal": f"{MAX_DIFF_GOAL} x max(1, max_abs_logit)", "argmax_agreement_goal": AGREEMENT_GOAL,
            "rows": rows, "passed": all(passes(row) for row in rows),
        },
    }


def versions() -> dict[str, str]:
    found = {"torch": torch.__version__}
    for name in ("torchvision", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = "not installed"
    from importlib.metadata import PackageNotFoundError, version

    try:
        found["segtrain"] = version("segtrain")
    except PackageNotFoundError:
        found["segtrain"] = "not installed"
    return found
