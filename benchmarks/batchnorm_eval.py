"""What eval-mode BatchNorm costs validation at batch 8: val mIoU with the running statistics
(what segtrain validates with) against the same weights with freshly averaged statistics.

    python benchmarks/batchnorm_eval.py --lr 0.006 --steps 90     # one learning rate per process
    python benchmarks/batchnorm_eval.py --smoke

Data: the generated 360x480 street-like folder set of ``real_data.py`` (123 train / 51 val),
``dataset.size=[176,240] dataset.batch_size=8`` and segtrain's folder defaults otherwise,
built by ``segtrain.build.build``. Every ``--every`` steps the model is validated twice: (a)
as is, in eval mode with BatchNorm's running mean/var (momentum 0.1: about the last 10
batches, from weights that have moved since); (b) a copy whose BatchNorm statistics are
re-estimated as a plain average over ``--bn-batches`` training batches with the current
weights ("precise BN"). If (b) is far above (a), the running statistics lag the weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose_config  # noqa: E402
from real_data import dataset_spec, make_folder  # noqa: E402
from segtrain.build import build  # noqa: E402
from segtrain.trainer import evaluate  # noqa: E402


def precise_bn(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the plain mean over ``batches``."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    with torch.no_grad():
        for images, _ in batches:
            model(images)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=0.006)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--every", type=int, default=15)
    parser.add_argument("--bn-batches", type=int, default=8)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.steps, args.every, args.bn_batches = 4, 2, 2
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "street"
        make_folder(root, 12 if args.smoke else 123, 4 if args.smoke else 51, *((72, 96) if args.smoke else (360, 480)))
        spec = dataset_spec("folder", root, args.smoke)
        cfg = compose_config([
            *spec["overrides"], "device_list=[]", f"optimizer.lr={args.lr}", "dataset.num_workers=0",
            f"trainer.max_steps={args.steps}", *args.overrides,
        ])
        components, _ = build(cfg)
        model, loss_fn, optimizer = components.model, components.loss_fn, components.optimizer
        rows, step = [], 0
        while step < args.steps:
            for images, masks in components.train_loader:
                model.train()
                loss = loss_fn(model(images), masks)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                components.scheduler.step()
                step += 1
                if step % args.every == 0 or step == args.steps:
                    batches = [batch for _, batch in zip(range(args.bn_batches), components.train_loader)]
                    val = [
                        evaluate(m, loss_fn, components.val_loader, components.device, components.num_classes, components.ignore_index)["mIoU"]
                        for m in (model, precise_bn(model, batches))
                    ]
                    rows.append({"step": step, "running": round(val[0], 4), "precise": round(val[1], 4)})
                    print(json.dumps({"lr": args.lr, **rows[-1]}), flush=True)
                if step >= args.steps:
                    break
    print(f"| lr {args.lr} | " + " | ".join(f"{r['step']}: {r['running']:.3f} / {r['precise']:.3f}" for r in rows) + " |")


if __name__ == "__main__":
    main()
