"""Train a segmentation model: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                   # UNet on the generated shapes dataset
    python train.py loss=focal device_list=[0]        # focal loss on CUDA device 0
    python train.py -m loss=ce,focal optimizer.lr=0.01,0.001   # a sweep of four runs
    python train.py resume=outputs/2026-11-23/10-00-00       # continue an interrupted run
    python train.py mode=eval resume=outputs/2026-11-23/10-00-00/best.pt
"""
import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import segtrain.distributed
import segtrain.overrides
import segtrain.run
import segtrain.run_lock
import segtrain.sweep
from segtrain.errors import USER_ERRORS
from segtrain.trainer import Interrupted

log = logging.getLogger("segtrain")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the best val mIoU, so Hydra sweepers can optimise it."""
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        if segtrain.sweep.in_multirun():  # skips finished jobs, resumes interrupted ones, a failed job returns NaN
            return segtrain.sweep.run_sweep_job(cfg, run_dir, segtrain.run.main)
        return segtrain.run.main(cfg, run_dir)
    except Interrupted as stop:
        where = f"python train.py resume={stop.checkpoint}" if stop.checkpoint else "(no checkpoint: trainer.save_checkpoints=false)"
        log.error("%s at a step boundary; resume with: %s", stop, where)
        sys.exit(128 + stop.signum)  # 143 for SIGTERM, 130 for SIGINT: schedulers can requeue on these
    except USER_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or segtrain.sweep.in_multirun():
            # The traceback, as Hydra shows for any error under HYDRA_FULL_ERROR=1; in a sweep the
            # sweeper records the failed job (Optuna: a failed trial) and goes on.
            raise
        log.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    sys.argv = segtrain.distributed.prepare_torchrun_argv(sys.argv)  # under torchrun: one run dir for all ranks; no -m
    unknown = segtrain.overrides.unknown_key_message(sys.argv[1:])  # a typo: one line, before Hydra's "+" hint
    if unknown:
        print(f"segtrain: {unknown}", file=sys.stderr)
        sys.exit(1)
    # A run dir that cannot be written, or that a live run holds: one line, before Hydra writes into it.
    problem = segtrain.run_lock.preflight_message(sys.argv[1:])
    if problem:
        print(f"segtrain: {problem}", file=sys.stderr)
        sys.exit(1)
    sys.argv = segtrain.run_lock.resume_in_its_run_dir(sys.argv)  # resume: this session's log into the run's train.log
    main()
