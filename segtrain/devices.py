"""Turn ``device_list`` into a torch device, with errors that say how to fix the config."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from segtrain.errors import ConfigError
import torch

log = logging.getLogger(__name__)


def uses_cuda(device_list: Sequence[int] | None) -> bool:
    """Whether ``device_list`` trains on CUDA: null when CUDA is available, or any index given."""
    return torch.cuda.is_available() if device_list is None else len(device_list) > 0


def resolve_device(device_list: Sequence[int] | None) -> torch.device:
    """``None``: CUDA device 0 if available, else the CPU; ``[]``: the CPU; ``[i]``: CUDA device i;
    ``[i, j, ...]``: the entry of this DDP process (``LOCAL_RANK``)."""
    if device_list is None:
        if uses_cuda(None):
            index = int(os.environ.get("LOCAL_RANK", 0))  # under torchrun: one GPU per local rank
            log.info("device_list=null: CUDA is available, training on cuda:%d (%s)", index, torch.cuda.get_device_name(index))
            return torch.device("cuda", index)
        log.info("device_list=null: CUDA is not available, training on the CPU")
        return torch.device("cpu")
    devices = list(device_list)
    if not devices:
        log.info("device_list=[]: training on the CPU")
        return torch.device("cpu")
    if not all(isinstance(index, int) and not isinstance(index, bool) for index in devices):
        raise ConfigError(f"device_list={devices}: entries must be CUDA device indices such as [0], or [] for the CPU")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device_list={devices}: CUDA is not available on this machine (torch.cuda.is_available() is False, "
            f"torch {torch.__version__}); train on the CPU with device_list=[]"
        )
    visible = torch.cuda.device_count()
    for index in devices:
        if not 0 <= index < visible:
            names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(visible))
            raise ConfigError(f"device_list={devices}: no CUDA device {index}; visible devices are {names}")
    index = devices[0]
    if len(devices) > 1:  # DDP: one process per entry; LOCAL_RANK (set by train.py's spawn or by torchrun) picks it
        if "LOCAL_RANK" not in os.environ:
            raise ConfigError(
                f"device_list={devices}: several devices train with DDP, one process each; run train.py "
                "(it spawns them) or torchrun, not this function alone"
            )
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= len(devices):
            raise ConfigError(
                f"device_list={devices}: LOCAL_RANK={local_rank} has no entry; give torchrun --nproc-per-node={len(devices)}"
            )
        index = devices[local_rank]
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)  # NCCL and the default CUDA stream of this process use its own device
    log.info("device_list=%s: training on %s (%s)", devices, device, torch.cuda.get_device_name(device))
    return device
