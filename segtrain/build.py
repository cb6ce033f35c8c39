"""The one place where a config becomes objects (``build``). What it builds (models, datasets, losses,
loaders, optimizer, scheduler) receives plain values: ints, floats, lists and dicts, never a DictConfig.
It also decides the facts the others read: the output channels, the ignore index, the steps per epoch."""
from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra.utils
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from segtrain import losses
from segtrain.audit import AuditReport, audit, can_audit, check_ignore_index, log_report
from segtrain.batches import EpochSampler, MaskCheck
from segtrain.checkpoint import init_weights_from
from segtrain.devices import resolve_device
from segtrain.distributed import ShardSampler, world, wrap_model
from segtrain.errors import ConfigError
from segtrain.inference import sliding_window_from
from segtrain.registry import DATASETS, LOSSES, MODELS, Registry
from segtrain.schedules import TimeBudget, build_scheduler, parse_seconds
from segtrain.task import output_channels

log = logging.getLogger(__name__)

# Dataset keys read by the framework (loader and task description), not by the dataset class.
LOADER_KEYS = ("batch_size", "val_batch_size", "num_workers")


@dataclass
class Components:
    """Everything ``build`` made for a run, and the facts it decided once for everyone to read."""

    device: torch.device
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    out_channels: int  # the model's logit channels: task.output_channels(num_classes, loss_fn.sigmoid)
    ignore_index: int | None  # dataset.ignore_index, given to the loss, the metrics and the mask check
    class_names: list[str]
    steps_per_epoch: int  # optimizer steps in one epoch (batches / trainer.accumulate, rounded up)
    total_steps: int  # trainer.max_steps, or max_epochs x steps_per_epoch
    val_every: int  # epochs between validations: trainer.val_every, or what `auto` chose (validation_cadence)
    time_budget: TimeBudget | None = None  # trainer.max_time (null: none); the scheduler follows it too


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def import_user_modules(modules: list[str] | None) -> None:
    """``imports=[mypackage.models]``: import modules whose decorators register users' models, datasets, losses."""
    for module in modules or []:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"imports: cannot import {module!r} ({error}); is its folder on PYTHONPATH?") from None


def check_names(cfg: DictConfig) -> None:
    """Fail before any work when a value is missing (``???``) or a group names something no registry knows."""
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if key.split(".")[0] in ("model", "dataset", "loss", "optimizer", "scheduler", "trainer"))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: no value (??? in the config); give {'it' if len(missing) == 1 else 'them'} on the command line "
            f"or in your experiment file, e.g. {missing[0]}=..."
        )
    import_user_modules(cfg.get("imports"))
    for group, registry in (("model", MODELS), ("dataset", DATASETS), ("loss", LOSSES)):
        node = cfg[group]
        if "_target_" not in node:
            if "name" not in node:
                raise ConfigError(f"{group}: the config needs a `name` (one of {', '.join(registry.names())}) or a `_target_`")
            registry.get(node.name)  # raises with the known names and a suggestion


def instantiate(registry: Registry, node: dict[str, Any], **arguments: Any) -> Any:
    """Build from ``name`` (a registry entry) or ``_target_`` (any importable class); a config key
    the registered entry does not take fails naming the key (``model.num_classes``), not a TypeError."""
    node = dict(node)
    if "_target_" in node:
        return hydra.utils.instantiate(node, **arguments)
    name = node.pop("name")
    factory = registry.get(name)
    parameters = inspect.signature(factory).parameters
    if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        unknown = [key for key in node if key not in parameters]
        if unknown:
            given = ", ".join(sorted(arguments))
            raise ConfigError(
                f"{', '.join(f'{registry.kind}.{key}' for key in unknown)}: not a parameter of {registry.kind}={name} "
                f"(it takes {', '.join(key for key in parameters if key not in arguments and key != 'self')}"
                + (f"; the builder gives it {given}" if given else "") + "); remove it from the config"
            )
    return factory(**node, **arguments)


def build_datasets(dataset_cfg: dict[str, Any]) -> tuple[Dataset, Dataset]:
    """The train and val splits; with ``dataset.cache=auto`` built without a cache (``keep_samples`` decides)."""
    params = {key: value for key, value in dataset_cfg.items() if key not in LOADER_KEYS}
    if params.get("cache") == "auto":
        params["cache"] = False
    train_set = instantiate(DATASETS, params, split="train")
    val_set = instantiate(DATASETS, params, split="val")
    for split, dataset in (("train", train_set), ("val", val_set)):
        if len(dataset) == 0:
            raise ConfigError(f"dataset={dataset_cfg.get('name')}: the {split} split is empty")
    return train_set, val_set


# dataset.num_workers=auto on CUDA: worker processes beside each training process, at most this many.
MAX_AUTO_WORKERS = 4
# dataset.cache=auto keeps the decoded samples when all copies together (one per loader worker, or
# one in the training process) stay under this many bytes.
CACHE_AUTO_BYTES = 2**30


def loader_workers(value: Any, device: torch.device) -> int:
    """``dataset.num_workers``; ``auto``: 0 on the CPU (the training process loads: worker processes
    would take cores from torch's own threads, benchmarks/README.md "Loading on the CPU"), and on CUDA
    one per core beside each training process, at most ``MAX_AUTO_WORKERS``."""
    if value == "auto":
        if device.type != "cuda":
            log.info("dataset.num_workers=auto: 0 on the CPU (the training process loads the data)")
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # training processes on this machine (torchrun)
        workers = max(1, min(MAX_AUTO_WORKERS, cores // processes - 1))
        log.info("dataset.num_workers=auto: %d per training process (%d cores, %d training processes)", workers, cores, processes)
        return workers
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"dataset.num_workers={value}: use a whole number >= 0 (0: load in the training process) or auto")
    return value


def keep_samples(value: Any, datasets: tuple[Dataset, ...], workers: int) -> bool | None:
    """``dataset.cache`` as the run uses it (None where the dataset has no such key); ``auto`` keeps the
    decoded samples when every copy (one per loader worker, else one) fits in ``CACHE_AUTO_BYTES``."""
    if value is None or isinstance(value, bool):
        return value
    if value != "auto":
        raise ConfigError(f"dataset.cache={value}: use true (keep decoded samples in memory), false or auto")
    if not all(hasattr(dataset, "decoded_bytes") for dataset in datasets):
        raise ConfigError(f"dataset.cache=auto: {type(datasets[0]).__name__} cannot estimate its size in memory; set dataset.cache=true or false")
    copies = max(1, workers)
    total = copies * sum(dataset.decoded_bytes() for dataset in datasets)
    keep = total <= CACHE_AUTO_BYTES
    for dataset in datasets:
        dataset.keep_samples(keep)
    where = f"{copies} copies, one per loader worker" if copies > 1 else "one copy"
    log.info(
        "dataset.cache=auto: %s decoded samples in memory (about %.0f MB in all, %s; the limit is %.0f MB)%s",
        "keeping" if keep else "not keeping", total / 2**20, where, CACHE_AUTO_BYTES / 2**20,
        "" if keep else "; dataset.cache=true keeps them anyway",
    )
    return keep


# model.depth=auto (UNet): the most downsamplings, at most MAX_AUTO_DEPTH, that leave the deepest
# feature map at least AUTO_DEPTH_MIN_SIDE pixels a side at the training size (benchmarks/README.md,
# "Rare classes").
MAX_AUTO_DEPTH = 4
AUTO_DEPTH_MIN_SIDE = 8


def unet_depth(value: Any, dataset_cfg: dict[str, Any], val_sizes: dict[tuple[int, ...], str]) -> int:
    """``model.depth``; ``auto``: from the shortest side the model trains on (``dataset.size``, else the
    smallest validation input), ``floor(log2(side / AUTO_DEPTH_MIN_SIDE))`` between 1 and ``MAX_AUTO_DEPTH``."""
    if isinstance(value, str) and value != "auto":
        raise ConfigError(f"model.depth={value}: use a whole number >= 1 (downsamplings) or auto")
    if value != "auto":
        return value  # the model checks its own numbers
    size = dataset_cfg.get("size")
    if size is not None:
        side, source = min(size) if isinstance(size, (list, tuple)) else int(size), f"dataset.size={size}"
    else:
        shape, source = min(val_sizes.items(), key=lambda item: min(item[0]))
        side = min(shape)
    depth = max(1, min(MAX_AUTO_DEPTH, math.floor(math.log2(max(1, side) / AUTO_DEPTH_MIN_SIDE))))
    log.info(
        "model.depth=auto: %d (shortest training side %d px from %s: the deepest features are %d px, at least %d; at most %d)",
        depth, side, source, side // 2**depth, AUTO_DEPTH_MIN_SIDE, MAX_AUTO_DEPTH,
    )
    return depth


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(
    dataset: Dataset, batch_size: int, num_workers: int, train: bool, seed: int, device: torch.device, mask_check: MaskCheck
) -> DataLoader:
    """Training: a seeded shuffle per epoch (``EpochSampler``), resumable mid-epoch; validation: in order.
    Every batch's mask values are checked on the CPU by ``mask_check`` (the collate function).

    Under DDP each process loads its shard (``batch_size`` is per process): training takes
    every ``world.size``-th sample of the epoch's shuffle, validation every ``world.size``-th
    image with no padding duplicates.
    """
    shard = world()
    sampler: Sampler | None = EpochSampler(dataset, batch_size, shuffle=True, seed=seed, num_replicas=shard.size, rank=shard.rank) if train else None
    if not train and shard.size > 1:
        sampler = ShardSampler(dataset, shard.size, shard.rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(dataset) > batch_size,  # no tiny last batch in training (BatchNorm)
        num_workers=num_workers,
        collate_fn=mask_check,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )


def class_pixel_counts(dataset: Dataset, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    """Pixels of each class over the masks of ``dataset`` (one pass), ignore index left out."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for index in range(len(dataset)):
        mask = torch.as_tensor(dataset[index][1]).reshape(-1)
        if ignore_index is not None:
            mask = mask[mask != ignore_index]
        counts += torch.bincount(mask.long(), minlength=num_classes)[:num_classes]
    return counts


def needs_training_masks(node: Any) -> bool:
    """True when any loss parameter (in nested terms too) is ``auto``."""
    if isinstance(node, dict):
        return any(needs_training_masks(value) for value in node.values())
    if isinstance(node, list):
        return any(needs_training_masks(value) for value in node)
    return node == "auto"


def build_run_loss(
    loss_cfg: dict[str, Any], model_cfg: dict[str, Any], train_set: Dataset, num_classes: int, ignore_index: int | None,
    class_counts: torch.Tensor | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The run's loss, and its config as run (every ``auto`` replaced by values from the training
    masks: ``class_counts`` from the data audit when given, else one pass over ``train_set``).

    ``dataset.ignore_index`` is given to every loss that takes one (``losses.with_ignore_index``).
    A model with an auxiliary head (``model.aux_loss``) gets its term from the loss side:
    ``loss(out) + model.aux_weight * loss(aux)`` (``losses.AuxiliaryHeadLoss``).
    """
    if needs_training_masks(loss_cfg):
        counts = class_counts if class_counts is not None else class_pixel_counts(train_set, num_classes, ignore_index)
        log.info("class pixel counts on the training masks: %s", counts.tolist())
        loss_cfg = losses.resolve_auto(loss_cfg, counts, num_classes)
        log.info("loss parameters with auto resolved: %s", loss_cfg)
    if "_target_" in loss_cfg:
        loss = hydra.utils.instantiate(loss_cfg)
    else:
        loss = losses.build_loss(**losses.with_ignore_index(loss_cfg, ignore_index))
    if isinstance(loss, losses.SegLoss):
        loss.check_targets = False  # the loaders check every batch on the CPU (MaskCheck): no host read per loss call
    if model_cfg.get("aux_loss"):
        loss = losses.AuxiliaryHeadLoss(loss, float(model_cfg.get("aux_weight", 0.5)))
    return loss, loss_cfg


# Model config keys read here, not by the model: fine-tuning weights and the aux head's loss weight.
MODEL_BUILD_KEYS = ("init_from", "init_strict", "aux_weight")


def build_model(model_cfg: dict[str, Any], out_channels: int) -> nn.Module:
    """The model with ``out_channels`` logits; ``init_from`` loads weights from a checkpoint (fine-tuning)."""
    params = {key: value for key, value in model_cfg.items() if key not in MODEL_BUILD_KEYS}
    model = instantiate(MODELS, params, out_channels=out_channels)
    if model_cfg.get("init_from"):
        init_weights_from(model, Path(model_cfg["init_from"]), bool(model_cfg.get("init_strict", True)))
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def build(cfg: DictConfig) -> tuple[Components, DictConfig]:
    """All objects of a run, and the config as run (``auto`` values resolved)."""
    check_names(cfg)
    device = resolve_device(OmegaConf.to_object(cfg.device_list) if cfg.device_list is not None else None)
    seed_everything(cfg.seed)
    deterministic = bool(cfg.trainer.get("deterministic", False))
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type == "cuda")
    torch.backends.cudnn.benchmark = not deterministic  # autotuned kernels are fast but not reproducible
    dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    num_classes, ignore_index = int(dataset_cfg["num_classes"]), dataset_cfg.get("ignore_index")
    train_set, val_set = build_datasets(dataset_cfg)
    class_names = resolve_class_names(dataset_cfg, train_set)
    check_ignore_index(num_classes, ignore_index, class_names)  # not a class of the model; before the audit reads the masks
    report = audit_data(train_set, val_set, class_names, dataset_cfg)
    workers = loader_workers(dataset_cfg["num_workers"], device)
    cache = keep_samples(dataset_cfg.get("cache"), (train_set, val_set), workers)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    loss_fn, loss_cfg = build_run_loss(
        OmegaConf.to_container(cfg.loss, resolve=True), model_cfg, train_set, num_classes, ignore_index,
        report.train_counts if report else None,
    )
    out_channels = output_channels(num_classes, getattr(loss_fn, "sigmoid", False))  # the binary rule, decided here once
    if model_cfg.get("in_channels") is None and hasattr(train_set, "in_channels"):
        model_cfg["in_channels"] = train_set.in_channels  # dataset.in_channels=null: read from the data
    val_sizes = validation_sizes(dataset_cfg, val_set, report)
    if "depth" in model_cfg:
        model_cfg["depth"] = unet_depth(model_cfg["depth"], dataset_cfg, val_sizes)
    model = build_model(model_cfg, out_channels).to(device)
    check_input_sizes(model, val_sizes, cfg.trainer)
    model = wrap_model(model, device, bool(cfg.trainer.get("sync_bn", False)))  # DDP when torch.distributed runs
    log.info(
        "model: %s (%.2f M parameters, %d output channels for %d classes)",
        cfg.model.get("name", cfg.model.get("_target_")), count_parameters(model) / 1e6, out_channels, num_classes,
    )
    log.info("loss: %s; dataset: %s (%d train, %d val samples)", loss_cfg.get("name", loss_cfg.get("_target_")), dataset_cfg.get("name"), len(train_set), len(val_set))
    optimizer = hydra.utils.instantiate(cfg.optimizer)(model.parameters())
    name = dataset_cfg.get("name", dataset_cfg.get("_target_"))
    train_loader = build_loader(
        train_set, dataset_cfg["batch_size"], workers, True, cfg.seed, device, MaskCheck(name, "train", out_channels, ignore_index)
    )
    val_loader = build_loader(
        val_set, val_batch_size(dataset_cfg), workers, False, cfg.seed, device, MaskCheck(name, "val", out_channels, ignore_index)
    )
    steps_per_epoch = max(1, math.ceil(len(train_loader) / int(cfg.trainer.get("accumulate", 1))))
    max_steps = cfg.trainer.max_steps
    total_steps = int(max_steps) if max_steps is not None else int(cfg.trainer.max_epochs) * steps_per_epoch
    val_every = validation_cadence(cfg.trainer, dataset_cfg, train_set, val_set, val_sizes, report)
    max_time = parse_seconds(cfg.trainer.get("max_time"))
    budget = TimeBudget(max_time) if max_time is not None else None
    scheduler = build_scheduler(OmegaConf.to_container(cfg.scheduler, resolve=True), optimizer, total_steps, steps_per_epoch, budget)
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.loss = loss_cfg
        if run_cfg.dataset.get("in_channels") is None:
            run_cfg.dataset.in_channels = model_cfg.get("in_channels")  # as read from the data
        run_cfg.trainer.val_every = val_every  # auto: the number it chose
        if "depth" in model_cfg:
            run_cfg.model.depth = model_cfg["depth"]  # auto: the depth it chose
        run_cfg.dataset.num_workers = workers
        if cache is not None:
            run_cfg.dataset.cache = cache
        for key in ("mean", "std"):  # dataset.mean/std=auto: the numbers the run normalised with
            if run_cfg.dataset.get(key) == "auto":
                run_cfg.dataset[key] = getattr(train_set, key)
    components = Components(
        device, model, loss_fn, optimizer, scheduler, train_loader, val_loader, num_classes, out_channels, ignore_index,
        class_names, steps_per_epoch, total_steps, val_every, budget,
    )
    return components, run_cfg


def validation_sizes(dataset_cfg: dict[str, Any], val_set: Dataset, report: AuditReport | None) -> dict[tuple[int, ...], str]:
    """The spatial sizes validation feeds the model, each with an example (a file, or what sets it)."""
    size = dataset_cfg.get("size")
    resized = dataset_cfg.get("size_mode") == "resize" and size is not None
    if report is not None and report.val_sizes and not (resized and all(len(shape) == 2 for shape in report.val_sizes)):
        return dict(report.val_sizes)  # spatial sizes: (H, W), or (D, H, W) for volumes (which keep crops)
    if resized:
        sizes = tuple(size) if isinstance(size, (list, tuple)) else (int(size),) * 2
        return {tuple(int(side) for side in sizes): "dataset.size (dataset.size_mode=resize)"}
    image = torch.as_tensor(val_set[0][0])
    return {tuple(image.shape[1:]): "the first validation sample"}


# trainer.val_every=auto: validate every epoch unless that would spend more than about a fifth of
# the time validating (validation pixels at most VAL_SHARE of an epoch's training cost).
VAL_SHARE = 0.25


def validation_cadence(
    trainer_cfg: Any, dataset_cfg: dict[str, Any], train_set: Dataset, val_set: Dataset,
    val_sizes: dict[tuple[int, ...], str], report: AuditReport | None,
) -> int:
    """``trainer.val_every``, with ``auto`` worked out from the pixels each side processes: an epoch
    trains on ``len(train_set)`` samples of ``dataset.size`` (forward and backward, about 3 forward
    passes), a validation runs one forward pass over every validation pixel (times the windows'
    overlap with ``val_mode=slide``). Every epoch when validation costs at most ``VAL_SHARE`` of an
    epoch (a folder set resized to ``dataset.size``: 0.14); else every k-th (ISBI's 6 whole 512x512
    slices against 24 crops of 128: 1.3 epochs, k=6). Pixels, not seconds: the choice is the same on
    every machine and in every session of a run."""
    value = trainer_cfg.get("val_every", 1)
    if value != "auto":
        return int(value)  # TrainerSettings checked it
    dims = len(next(iter(val_sizes))) if val_sizes else 2
    size = dataset_cfg.get("size")
    train_side = [int(side) for side in size] if isinstance(size, (list, tuple)) else [int(size)] * dims if size else None
    resized = dataset_cfg.get("size_mode") == "resize" and train_side is not None
    if report is not None and report.pixel_counts.get("val") is not None and not resized:
        val_pixels = float(report.pixel_counts["val"].sum() + report.ignored_pixels["val"])  # every mask pixel of the split
    else:
        val_pixels = len(val_set) * float(np.mean([math.prod(shape) for shape in val_sizes])) if val_sizes else 0.0
    per_sample = math.prod(train_side) if train_side else val_pixels / max(len(val_set), 1)
    train_cost = 3.0 * len(train_set) * per_sample
    windows = validation_windows(trainer_cfg, dims)
    if windows is not None:
        window, stride = windows
        val_pixels *= math.prod(w / s for w, s in zip(window, stride))
    ratio = val_pixels / max(train_cost, 1.0)
    every = max(1, math.ceil(ratio / VAL_SHARE - 1e-9))
    log.info(
        "trainer.val_every=auto: validating every %d epoch%s (one validation costs about %.2f epochs of training: %.2g validation "
        "pixels, one forward pass, against %d training samples of %s, forward and backward; every epoch would spend %.0f %% "
        "of the time validating, every %d about %.0f %%)",
        every, "" if every == 1 else "s", ratio, val_pixels, len(train_set), "x".join(map(str, train_side or ["whole"])),
        100 * ratio / (1 + ratio), every, 100 * ratio / (every + ratio),
    )
    return every


def validation_windows(trainer_cfg: Any, dims: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``trainer.val_mode=slide``: the window and stride per axis (as validation will use them); None for whole images."""
    sliding = sliding_window_from(trainer_cfg.get("val_mode", "whole"), trainer_cfg.get("window"), trainer_cfg.get("stride"))
    return sliding.per_axis(dims) if sliding is not None else None


def check_input_sizes(model: nn.Module, sizes: dict[tuple[int, ...], str], trainer_cfg: Any) -> None:
    """Before the first step: every validation input must be large enough for the model (a UNet of
    depth d pools d times: 2^d pixels a side); sizes that are no multiple of that are fine (the
    decoder interpolates) and said once in the log. With sliding windows the windows are checked."""
    windows = validation_windows(trainer_cfg, len(next(iter(sizes))) if sizes else 2)
    if windows is not None:
        sizes = {windows[0]: "trainer.window"}
    check_divisible_sizes(model, sizes)
    multiple = getattr(model, "size_multiple", None)
    if not multiple or not sizes:
        return
    depth = int(math.log2(multiple))
    small = [(shape, name) for shape, name in sizes.items() if min(shape) < multiple]
    if small:
        shape, name = min(small, key=lambda item: min(item[0]))
        fits = int(math.log2(max(1, min(shape))))  # a UNet has depth 1 at least: below 2 pixels no depth fits
        raise ConfigError(
            f"validation input {'x'.join(map(str, shape))} ({name}) is smaller than 2^model.depth={multiple} pixels a side, "
            f"which model.depth={depth} needs to pool {depth} times: use " + (f"model.depth={fits} or less, " if fits >= 1 else "")
            + f"larger images, or trainer.val_mode=slide with trainer.window={multiple} or more (smaller images are padded to it)"
        )
    odd = [shape for shape in sizes if any(side % multiple for side in shape)]
    if odd:
        log.info(
            "validation inputs such as %s are not multiples of 2^model.depth=%d: the UNet interpolates its decoder "
            "features to each skip's size (no padding)", "x".join(map(str, odd[0])), multiple,
        )


def check_divisible_sizes(model: nn.Module, sizes: dict[tuple[int, ...], str]) -> None:
    """segmentation_models_pytorch's architectures that need sides divisible by the encoder's output
    stride (FPN, DeepLabV3Plus, ...; not its Unet) refuse other inputs in ``check_input_shape``: asked
    here with each size, so a wrong one fails before the first step instead of at the first validation."""
    check_input_shape = getattr(model, "check_input_shape", None)
    if not callable(check_input_shape):
        return
    for shape, name in sizes.items():
        try:
            check_input_shape(torch.empty(1, 1, *shape, device="meta"))  # reads the shape only
        except RuntimeError:
            stride = getattr(getattr(model, "encoder", None), "output_stride", "its encoder's output stride")
            raise ConfigError(
                f"validation input {'x'.join(map(str, shape))} ({name}): model.arch={type(model).__name__} needs sides divisible "
                f"by {stride}; use dataset.size_mode=resize with such a dataset.size, trainer.val_mode=slide with such a "
                "trainer.window (smaller images are padded to it), or model.arch=Unet (any size)"
            ) from None


def resolve_class_names(dataset_cfg: dict[str, Any], train_set: Dataset) -> list[str]:
    """``dataset.class_names``, else the dataset's own names, else ``class_<i>``; one per class."""
    num_classes = int(dataset_cfg["num_classes"])
    names = list(dataset_cfg.get("class_names") or getattr(train_set, "class_names", None) or [f"class_{i}" for i in range(num_classes)])
    if len(names) != num_classes:
        raise ConfigError(f"dataset.class_names has {len(names)} names but dataset.num_classes={num_classes}")
    return names


def val_batch_size(dataset_cfg: dict[str, Any]) -> int:
    """Whole validation images may differ in size: ``dataset.val_batch_size`` (1 for on-disk data) batches them."""
    return int(dataset_cfg.get("val_batch_size") or dataset_cfg["batch_size"])


def audit_data(
    train_set: Dataset, val_set: Dataset, class_names: list[str], dataset_cfg: dict[str, Any], log_table: bool = True
) -> AuditReport | None:
    """The pre-flight audit of on-disk datasets (raises naming bad files; logs the class table); None for generated data."""
    if not (can_audit(train_set) and can_audit(val_set)):
        return None
    report = audit({"train": train_set, "val": val_set}, class_names, val_batch_size(dataset_cfg))
    if log_table:
        log_report(report)
    return report


def build_audit(cfg: DictConfig) -> AuditReport | None:
    """Only the datasets and their audit (``mode=audit``): no model, no device."""
    check_names(cfg)
    dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    train_set, val_set = build_datasets(dataset_cfg)
    return audit_data(train_set, val_set, resolve_class_names(dataset_cfg, train_set), dataset_cfg, log_table=False)  # the caller prints it
