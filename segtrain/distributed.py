"""Many devices, one run: DDP keyed on the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``).

Two ways in, one code path:

* ``python train.py device_list=[0,1,2,3]`` (or ``device_list=[] trainer.cpu_processes=2``):
  the Hydra task resolves the config once and spawns one worker per device with
  ``torch.multiprocessing``; the workers meet through a file rendezvous (no port to
  collide on), set the same environment variables as torchrun, train, and rank 0 hands
  the best val mIoU back to the task. ``-m`` sweeps, Optuna and submitit work unchanged.
* ``torchrun ... train.py ...``: the launcher's ranks; ``LOCAL_RANK`` picks the entry of
  ``device_list``. train.py names one run dir for all ranks (``prepare_torchrun_argv``).

Backend: NCCL on CUDA, gloo on the CPU. Only rank 0 writes TensorBoard, checkpoints,
``metrics.json``, logs and the progress bar (``is_main``).

Loss normalisation: each process averages its loss over its own counted pixels (the
ignore index left out), and DDP averages the gradients of the processes. The step thus
follows the mean of per-process means: equal to the mean over all counted pixels of the
global batch when the processes count as many pixels (no ignore index, equal crops), and
otherwise a process with fewer counted pixels weighs each of them a little more.
Validation metrics are exact: the confusion matrices are summed across processes.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Sampler

from segtrain.devices import uses_cuda
from segtrain.errors import USER_ERRORS, ConfigError, RankError

log = logging.getLogger(__name__)

# Keys of the trainer group read here, not by the Trainer.
DISTRIBUTED_KEYS = ("cpu_processes", "sync_bn", "dist_timeout")


class DistributedError(RuntimeError):
    """A DDP worker failed or died; the message names the rank and its error."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's rank and the number of processes (``World()`` without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size())


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files, logs and the progress bar."""
    return world().is_main


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def process_count(cfg: DictConfig) -> int:
    """Processes of one run: one per entry of ``device_list``, or ``trainer.cpu_processes`` with ``device_list=[]``."""
    devices = cfg.get("device_list")
    cpu_processes = int(cfg.trainer.get("cpu_processes", 1) or 1)
    if devices is not None and len(devices) > 0:
        if cpu_processes > 1:
            raise ConfigError(
                f"trainer.cpu_processes={cpu_processes} with device_list={list(devices)}: CPU processes need "
                "device_list=[]; on CUDA, one process runs per entry of device_list"
            )
        return len(devices)
    if cpu_processes < 1:
        raise ConfigError(f"trainer.cpu_processes={cpu_processes}: must be at least 1")
    if devices is None and cpu_processes > 1:
        raise ConfigError(f"trainer.cpu_processes={cpu_processes} needs device_list=[] (the CPU)")
    return cpu_processes


def needs_spawn(cfg: DictConfig) -> bool:
    return not under_torchrun() and process_count(cfg) > 1


def backend_for(cfg: DictConfig) -> str:
    devices = cfg.get("device_list")
    return "nccl" if uses_cuda(None if devices is None else list(devices)) else "gloo"


@contextlib.contextmanager
def process_group(cfg: DictConfig, init_method: str = "env://") -> Iterator[World]:
    """Join the process group (ranks from the environment); collectives time out after ``trainer.dist_timeout`` s."""
    timeout = datetime.timedelta(seconds=float(cfg.trainer.get("dist_timeout", 300)))
    backend = backend_for(cfg)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout)
    try:
        yield world()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------ spawning
def setup_worker_logging(rank: int, log_file: str | None) -> None:
    """Spawned workers start with bare logging: rank 0 logs INFO to the console and the job's log file, the others warnings."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(f"[%(asctime)s][%(name)s][%(levelname)s][rank {rank}] - %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0 and log_file:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def spawned_worker(
    index: int, size: int, config: dict[str, Any], run_dir: str, init_method: str,
    train: Callable[[DictConfig, Path], float], results: Any, log_file: str | None,
) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(size))
    setup_worker_logging(index, log_file)
    cfg = OmegaConf.create(config)
    if backend_for(cfg) == "gloo":  # share the cores: each process running all-core kernels would thrash
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    with process_group(cfg, init_method):
        best = train(cfg, Path(run_dir))
    if index == 0:
        results.put(best)


def rank_user_error(traceback_text: str) -> str | None:
    """The message of a worker's traceback when its error is a user error (``errors.USER_ERRORS``), else None."""
    last = next((line for line in reversed(traceback_text.strip().splitlines()) if line.strip()), "")
    name, _, message = last.partition(": ")
    if name.rsplit(".", 1)[-1] in {error.__name__ for error in USER_ERRORS} and message:
        return message
    return None


def launch(cfg: DictConfig, run_dir: str | Path, train: Callable[[DictConfig, Path], float]) -> float:
    """Spawn one DDP worker per device (or CPU process) running ``train(cfg, run_dir)``; rank 0's result."""
    size = process_count(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)  # resolved once: every rank sees the same values
    log_file = None
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        log_file = str(Path(HydraConfig.get().runtime.output_dir) / f"{HydraConfig.get().job.name}.log")
    log.info("DDP: spawning %d processes (%s backend)", size, backend_for(cfg))
    rendezvous = Path(tempfile.mkdtemp(prefix="segtrain-ddp-"))  # a file rendezvous: parallel runs never collide on a port
    if multiprocessing.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
        # In a joblib (loky) worker the default method is "loky"; spawned children would fail to find it.
        multiprocessing.set_start_method("spawn", force=True)
    results = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(
            spawned_worker, args=(size, config, str(run_dir), f"file://{rendezvous / 'store'}", train, results, log_file),
            nprocs=size, join=True,
        )
    except mp.ProcessRaisedException as error:
        user_error = rank_user_error(str(error))
        if user_error:  # a config or data mistake seen by a worker: one line, as in one process
            raise RankError(f"DDP rank {error.error_index}: {user_error}") from None
        raise DistributedError(f"DDP rank {error.error_index} failed; the other ranks were stopped. Its error:\n{error}") from None
    except mp.ProcessExitedException as error:
        how = f"was killed by {error.signal_name}" if error.signal_name else f"exited with status {error.exit_code}"
        raise RankError(
            f"DDP rank {error.error_index} {how}; the other ranks were stopped. last.pt in {run_dir} holds the last checkpoint: "
            f"once the cause is found (out of host memory? the kernel log says), continue with resume={run_dir}"
        ) from None
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)
    return float(results.get())


# ------------------------------------------------------------------ torchrun
def prepare_torchrun_argv(argv: list[str]) -> list[str]:
    """Under torchrun: refuse ``-m``; give all ranks one run dir (the rendezvous id names it unless
    ``hydra.run.dir`` is given); only rank 0 writes ``.hydra/`` and the log file."""
    if not under_torchrun():
        return argv
    if any(arg in ("-m", "--multirun") for arg in argv[1:]):
        raise SystemExit(
            "train.py -m under torchrun: a sweep cannot run inside one DDP launch (every rank would run every job). "
            "Sweep with `python train.py -m device_list=[0,1] ...` (DDP spawned per job) or run torchrun once per job."
        )
    argv = list(argv)
    if not any(arg.startswith("hydra.run.dir=") for arg in argv[1:]):
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        if run_id in ("", "none"):
            raise SystemExit(
                "torchrun without --rdzv-id: the ranks cannot agree on a run dir (each would make its own from the "
                "clock); add --rdzv-id=<name> (the run dir becomes outputs/torchrun/<name>) or hydra.run.dir=<dir>"
            )
        argv.append(f"hydra.run.dir=outputs/torchrun/{run_id}")
    if int(os.environ.get("RANK", 0)) != 0:
        argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
    return argv


# ------------------------------------------------------------------ model and data
def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """DDP around the model when torch.distributed runs; ``sync_bn`` converts BatchNorm to SyncBatchNorm on CUDA."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the parameter objects: the optimizer still holds them
        log.info("trainer.sync_bn=true: BatchNorm statistics are synchronised across the %d processes", dist.get_world_size())
    elif sync_bn:
        log.warning("trainer.sync_bn=true: SyncBatchNorm runs on CUDA only; on the CPU each process keeps its own BatchNorm statistics")
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class ShardSampler(Sampler[int]):
    """Validation shard of this process: every ``size``-th index from ``rank``; no index padded or repeated,
    so the summed confusion matrices count each pixel once."""

    def __init__(self, dataset: Sized, size: int, rank: int) -> None:
        self.indices = list(range(rank, len(dataset), size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
