"""mode=export per model: export time, file sizes, the parity check (onnxruntime and the
torch.export program against PyTorch) and CPU inference latency of PyTorch and onnxruntime.

    python benchmarks/export.py            # the table in benchmarks/README.md (a few minutes on 2 cores)
    python benchmarks/export.py --smoke    # the UNet at a tiny size (CI keeps it working)

Each model is built from its config file (random init, eval mode, seed 0) and exported
through the same functions ``mode=export`` uses (``segtrain/export.py``); the check runs a
batch of 2 random images at the export size and at 1.5x. Latency: median of ``--repeats``
single-image forwards at the export size after two warm-up runs, one torch thread and one
onnxruntime thread, so that neither uses more of the shared machine than the other.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from common import compose_config, machine, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from segtrain.build import build_model, unet_depth  # noqa: E402
from segtrain.export import check, export_program, other_size, resize, write_onnx  # noqa: E402

MODELS = {  # model config -> (overrides, spatial size of the export)
    "unet": ([], (128, 128)),
    "unet3d": (["dataset=shapes3d"], (32, 32, 32)),
    "lraspp_mobilenet_v3_large": ([], (128, 128)),
    "deeplabv3_mobilenet_v3_large": ([], (128, 128)),
    "fcn_resnet50": ([], (128, 128)),
    "deeplabv3_resnet50": ([], (128, 128)),
}


def latency_ms(run, repeats: int) -> float:
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(name: str, overrides: list[str], size: tuple[int, ...], repeats: int) -> list[str]:
    import onnxruntime

    torch.manual_seed(0)
    cfg = compose_config([f"model={name}", *overrides])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if "depth" in model_cfg:  # model.depth=auto: as a run of this config resolves it (from dataset.size)
        model_cfg["depth"] = unet_depth(model_cfg["depth"], OmegaConf.to_container(cfg.dataset, resolve=True), {})
    model = build_model(model_cfg, int(cfg.dataset.num_classes)).eval()
    channels = int(cfg.model.in_channels)
    example = torch.rand(2, channels, *size)
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder)
        start = time.perf_counter()
        program, axes = export_program(model, example, cfg)
        torch.export.save(program, output / "model.pt2")
        write_onnx(program, output / "model.onnx", cfg)
        seconds = time.perf_counter() - start
        rows = check(model, output, [example, resize(example, other_size(size))])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(output / "model.onnx"), options, providers=["CPUExecutionProvider"])
        single = torch.rand(1, channels, *size)
        input_name = session.get_inputs()[0].name
        with torch.no_grad():
            torch_ms = latency_ms(lambda: model(single), repeats)
        ort_ms = latency_ms(lambda: session.run(None, {input_name: single.numpy()}), repeats)
        onnx_mb = (output / "model.onnx").stat().st_size / 2**20
        pt2_mb = (output / "model.pt2").stat().st_size / 2**20
    worst_diff = max(row["max_abs_diff"] for row in rows)
    worst_relative = max(row["max_abs_diff"] / max(1.0, row["max_abs_logit"]) for row in rows)
    agreement = min(row["argmax_agreement"] for row in rows)
    return [
        name, "x".join(map(str, size)), ", ".join(axes["fixed"]) or "none", f"{seconds:.1f}", f"{onnx_mb:.1f} / {pt2_mb:.1f}",
        f"{worst_diff:.1e}", f"{worst_relative:.1e}", f"{agreement:.4%}", f"{torch_ms:.1f}", f"{ort_ms:.1f}",
        "yes" if worst_relative <= 1e-4 and agreement >= 0.999 else "no",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the UNet at 32x32, 2 repeats (CI)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [(name, *MODELS[name]) for name in args.models]
    if args.smoke:
        runs, args.repeats = [("unet", [], (32, 32))], 2
    print(f"machine: {machine()}")
    print(f"random-init models in eval mode; check on 2 images at the export size and 1.5x; latency: 1 image, 1 thread, median of {args.repeats}")
    rows = [measure(name, overrides, size, args.repeats) for name, overrides, size in runs]
    print_table(
        ["model", "export size", "fixed axes", "export s", "onnx / pt2 MiB", "max abs diff", "max abs diff / max(1, max abs logit)",
         "argmax agreement", "torch ms", "onnxruntime ms", "check passed"],
        rows,
    )


if __name__ == "__main__":
    main()
