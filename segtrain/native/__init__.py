"""C kernels for the CPU, compiled on first use with the system C compiler and called through ctypes.

Only the softmax focal loss has one (``focal.c``): as PyTorch ops it walks the logits
about seven times and makes ~100 op calls a step; the kernel reads them once forward and
once backward. The source has no Python or torch headers, so it builds in well under a
second; the library is cached under ``$SEGTRAIN_CACHE_DIR/kernels`` (default
``~/.cache/segtrain/kernels``), keyed by a hash of the source, the compiler and the CPU.

A new build is run once in a child process on a small case checked against Python's
``math`` before it is cached. Where there is no compiler, or the build or that check fails,
the losses use their PyTorch ops (one warning says so). ``SEGTRAIN_NATIVE=0`` turns the kernels off (the PyTorch path, as on CUDA).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from segtrain.cache import cache_root

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("focal.c"), Path(__file__).with_name("focal_body.h")]
ENV_SWITCH = "SEGTRAIN_NATIVE"
# Tried in order. The first uses this CPU's vector units, glibc's vector math (libmvec) and
# OpenMP; the others drop the vector math, then OpenMP, for compilers or C libraries without them.
FLAG_SETS = [
    ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-lmvec", "-lm"],
    ["-O3", "-fno-math-errno", "-fopenmp", "-DSEGTRAIN_SCALAR_MATH", "-lm"],
    ["-O3", "-fno-math-errno", "-DSEGTRAIN_SCALAR_MATH", "-lm"],
]
# Below this many logits per thread, waking another thread costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 1 << 15


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def cache_dir() -> Path:
    """Where built libraries are kept: ``kernels/`` beside the data audit's cache."""
    return cache_root() / "kernels"


def _fingerprint(version: str, flags: list[str]) -> str:
    """Names a build by its source, compiler (``cc --version``), flags and CPU."""
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update("\0".join([version, *flags, platform.machine(), sys.platform]).encode())
    try:  # -march=native code must not be loaded on another CPU (a cache dir on a shared disk)
        with open("/proc/cpuinfo") as cpuinfo:
            digest.update(next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "").encode())
    except OSError:
        pass
    return digest.hexdigest()[:16]


# Run on each newly built library in a child process before it is cached: a library that
# crashes (say, -march=native code the CPU refuses) or computes wrong values is not used.
SELF_TEST = r"""
import ctypes, math, sys
lib = ctypes.CDLL(sys.argv[1])
n, c, p, gamma = 1, 3, 2, 2.0
logits, target = [0.0, 1.0, 2.0, 3.0, -1.0, 0.5], [0, 2]  # (1, 3, 2), pixel i's logits: logits[i::p]
for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
    x, t = (real * 6)(*logits), (ctypes.c_int64 * 2)(*target)
    loss, ngrad, lse, grad = (real * 2)(), (real * 2)(), (real * 2)(), (real * 6)()
    getattr(lib, "segtrain_focal_forward_" + suffix)(
        x, t, None, ctypes.c_int64(n), ctypes.c_int64(c), ctypes.c_int64(p), ctypes.c_double(gamma),
        loss, ngrad, lse, ctypes.c_int(1))
    getattr(lib, "segtrain_focal_backward_" + suffix)(
        x, t, ngrad, lse, ctypes.c_int64(n), ctypes.c_int64(c), ctypes.c_int64(p), grad, ctypes.c_int(1))
    for i in range(p):
        row = logits[i::p]
        log_sum_exp = max(row) + math.log(sum(math.exp(v - max(row)) for v in row))
        log_p = row[target[i]] - log_sum_exp
        p_t = math.exp(log_p)
        expected = [-(1 - p_t) ** gamma * log_p, (1 - p_t) ** gamma - gamma * p_t * log_p * (1 - p_t) ** (gamma - 1)]
        got = [loss[i], ngrad[i]]
        expected += [expected[1] * (math.exp(v - log_sum_exp) - (k == target[i])) for k, v in enumerate(row)]
        got += [grad[k * p + i] for k in range(c)]
        if any(abs(a - b) > 1e-5 * (1 + abs(b)) for a, b in zip(got, expected)):
            sys.exit(f"{suffix} pixel {i}: got {got}, expected {expected}")
"""


def _build(compiler: str, version: str, flags: list[str], directory: Path) -> Path:
    target = directory / f"focal-{_fingerprint(version, flags)}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: processes starting together (a sweep,
    # DDP) never load a half-written file.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(handle)
    libraries = [flag for flag in flags if flag.startswith("-l")]
    options = [flag for flag in flags if not flag.startswith("-l")]
    command = [compiler, *options, "-fPIC", "-shared", "-Wl,--no-undefined", "-o", partial, str(SOURCES[0]), *libraries]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
        check = subprocess.run([sys.executable, "-c", SELF_TEST, partial], capture_output=True, text=True, timeout=120)
        if check.returncode != 0:
            raise RuntimeError(f"the library built by {' '.join(command)} failed its self-test "
                               f"(exit {check.returncode}): {check.stderr.strip()[-2000:]}")
        os.replace(partial, target)
        log.info("built the CPU focal-loss kernel in %.1f s: %s", time.perf_counter() - start, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (the reason is logged once)."""
    if sys.platform != "linux":  # built and tested with gcc and glibc only
        log.info("the CPU focal-loss kernel is built on Linux only: the focal loss uses PyTorch ops")
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        log.warning("no C compiler (%s) found: the focal loss uses PyTorch ops on the CPU (slower); "
                    "install one (e.g. gcc) or set CC for the fused kernel", compiler)
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("%s --version failed (%s): the focal loss uses PyTorch ops on the CPU (slower)", compiler, error)
        return None
    errors = []
    for flags in FLAG_SETS:
        for directory in (cache_dir(), Path(tempfile.gettempdir()) / f"segtrain-{os.getuid()}"):
            try:
                lib = ctypes.CDLL(str(_build(compiler, version, flags, directory)))
                _declare(lib)
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
                errors.append(str(error))
                continue
            log.debug("CPU kernels: %s %s", compiler, " ".join(flags))
            return lib
    log.warning("could not build the CPU focal-loss kernel, using PyTorch ops (slower):\n%s", "\n".join(errors))
    return None


def _declare(lib: ctypes.CDLL) -> None:
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    for suffix in ("f32", "f64"):
        forward = getattr(lib, f"segtrain_focal_forward_{suffix}")
        forward.argtypes = [pointer] * 3 + [integer] * 3 + [ctypes.c_double] + [pointer] * 3 + [ctypes.c_int]
        forward.restype = None
        backward = getattr(lib, f"segtrain_focal_backward_{suffix}")
        backward.argtypes = [pointer] * 4 + [integer] * 3 + [pointer, ctypes.c_int]
        backward.restype = None


def usable(logits: Tensor) -> bool:
    """Whether the focal kernel takes these logits: float32/float64 on the CPU, kernels on and built."""
    return (
        logits.device.type == "cpu"
        and logits.dtype in (torch.float32, torch.float64)
        and enabled()
        and library() is not None
    )


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _threads(logits: Tensor) -> int:
    return max(1, min(torch.get_num_threads(), logits.numel() // MIN_ELEMENTS_PER_THREAD))


def _check(logits: Tensor, target: Tensor, *per_pixel: Tensor | None) -> None:
    """The C code trusts its pointers: shapes, dtypes and layouts are checked here, once per call."""
    pixels = (logits.shape[0], *logits.shape[2:])
    ok = (
        logits.dtype in _SUFFIX and logits.device.type == "cpu" and logits.is_contiguous()
        and target.dtype == torch.int64 and tuple(target.shape) == pixels and target.is_contiguous()
        and all(t is None or (t.dtype == logits.dtype and tuple(t.shape) == pixels and t.is_contiguous())
                for t in per_pixel)
    )
    if not ok:
        raise ValueError(
            f"focal kernel: expected contiguous CPU logits (N, C, *spatial) of float32/float64 and contiguous "
            f"int64 targets / per-pixel tensors of shape {pixels}; got logits {logits.dtype} "
            f"{tuple(logits.shape)}, target {target.dtype} {tuple(target.shape)}, per-pixel "
            f"{[None if t is None else (t.dtype, tuple(t.shape)) for t in per_pixel]}"
        )


def focal_forward(
    logits: Tensor, target: Tensor, weight: Tensor | None, gamma: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel loss, ``-dloss/dlog p_t`` and log-sum-exp, each ``target``-shaped.

    ``logits`` (N, C, *spatial) contiguous, ``target`` int64 in [0, C) contiguous, ``weight``
    per pixel of the logits' dtype, contiguous, or None.
    """
    _check(logits, target, weight)
    n, c, p = logits.shape[0], logits.shape[1], math.prod(target.shape[1:])
    loss, ngrad, lse = (torch.empty(target.shape, dtype=logits.dtype) for _ in range(3))
    getattr(library(), f"segtrain_focal_forward_{_SUFFIX[logits.dtype]}")(
        logits.data_ptr(), target.data_ptr(), None if weight is None else weight.data_ptr(), n, c, p,
        float(gamma), loss.data_ptr(), ngrad.data_ptr(), lse.data_ptr(), _threads(logits),
    )
    return loss, ngrad, lse


def focal_backward(logits: Tensor, target: Tensor, coefficient: Tensor, lse: Tensor) -> Tensor:
    """``coefficient * (softmax(logits) - one_hot(target))``, the logits' gradient."""
    _check(logits, target, coefficient, lse)
    n, c, p = logits.shape[0], logits.shape[1], math.prod(target.shape[1:])
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    getattr(library(), f"segtrain_focal_backward_{_SUFFIX[logits.dtype]}")(
        logits.data_ptr(), target.data_ptr(), coefficient.data_ptr(), lse.data_ptr(), n, c, p,
        grad.data_ptr(), _threads(logits),
    )
    return grad
