"""Turn ``device_list`` into a torch device, with errors that say how to fix the config."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def resolve_device(device_list: Sequence[int] | None) -> torch.device:
    """``None``: CUDA device 0 if available, else the CPU; ``[]``: the CPU; ``[i]``: CUDA device i."""
    if device_list is None:
        if torch.cuda.is_available():
            log.info("device_list=null: CUDA is available, training on cuda:0 (%s)", torch.cuda.get_device_name(0))
            return torch.device("cuda", 0)
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
    if len(devices) > 1:
        raise ConfigError(
            f"device_list={devices}: training on several devices (DDP) is not implemented yet; "
            f"use one device, e.g. device_list=[{devices[0]}]"
        )
    device = torch.device("cuda", devices[0])
    log.info("device_list=%s: training on %s (%s)", devices, device, torch.cuda.get_device_name(device))
    return device
