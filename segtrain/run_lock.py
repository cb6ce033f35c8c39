"""One live run per run dir: ``with owning(run_dir): ...`` around everything a run writes there.

The lock is ``fcntl.flock`` on ``<run_dir>/.segtrain.lock``. The kernel releases it when the
holding process exits in any way (an exception, SIGTERM, ``kill -9``, a machine crash), so a lock
file left behind by a dead run is free, not an error. The file records who holds it (pid, host,
start time, command line), so that a second run into a live run's dir fails at once naming it.

Only one process per run should hold it: the launching process, or rank 0 of a DDP run
(the other ranks write nothing into the run dir). On NFS, ``flock`` is only as good as the
server's lock support (NFSv4 locks work).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from segtrain.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".segtrain.lock"
# Lock files this process holds, by resolved run dir: [file descriptor, nesting depth]. A process
# that takes its own run dir's lock twice (nested calls) must not fail against itself: two
# flock()s on two open()s of one file conflict even within one process.
_held: dict[str, list[int]] = {}


@contextlib.contextmanager
def owning(run_dir: str | Path, resuming: bool = False) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the body; raise :class:`ConfigError` if a live run holds it.

    ``resuming`` only changes the advice in the message (wait for the run rather than pick another dir).
    """
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key][1] += 1
        try:
            yield run_dir
        finally:
            _held[key][1] -= 1
        return
    descriptor = _acquire(run_dir, resuming)
    _held[key] = [descriptor, 1]
    try:
        yield run_dir
    finally:
        del _held[key]
        _release(descriptor)


def holder(run_dir: str | Path) -> dict | None:
    """Who holds ``run_dir``'s lock (pid, host, since, command), or None if no live process does."""
    path = Path(run_dir) / LOCK_NAME
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _record(path) or {}
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


def unwritable_message(key: str, folder: str | Path) -> str | None:
    """Why ``folder`` (the value of the config ``key``) cannot be a run dir, or None when it can.

    Creates nothing: probes the folder itself or, when it does not exist yet, its nearest existing parent.
    """
    target = Path(folder)
    existing = target
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling or looping link: mkdir would fail on it
            return f"{key}={folder}: {existing} is a broken symbolic link; give {key} a folder you can write"
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={folder}: {existing} is a file, not a folder; give {key} a folder you can write"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return (
            f"{key}={folder}: cannot write in {existing} ({error.strerror or error}); "
            f"give {key} a folder you can write (e.g. under your home directory)"
        )
    return None


def run_dir_argument(argv: list[str]) -> tuple[str, str]:
    """The config key of the run dir for this command line and the folder to check, as ``(key, folder)``.

    An explicit ``hydra.run.dir=`` (``hydra.sweep.dir=`` with ``-m``), else the default ``outputs``;
    a value with ``${...}`` interpolations is checked up to its first one (``outputs/${now:...}`` -> ``outputs``).
    """
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    value = "outputs"
    for arg in argv:
        name, _, given = arg.lstrip("+").partition("=")
        if name == key and given:
            value = given
    if "${" in value:
        value = value.split("${", 1)[0]
        value = (value[: value.rfind("/")] or "/") if "/" in value else "."
    return key, value


HYDRA_INFO_FLAGS = ("-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion")


def preflight_message(argv: list[str]) -> str | None:
    """Before Hydra writes anything (``.hydra/``, ``train.log``): why this command line cannot run, or None.

    Catches a run dir that cannot be written and an explicit ``hydra.run.dir`` or ``resume`` dir that a live
    run holds. Only a first look: :func:`owning` is what keeps a second run out.
    """
    if any(arg in HYDRA_INFO_FLAGS for arg in argv):
        return None
    key, folder = run_dir_argument(argv)
    problem = unwritable_message(key, folder)
    if problem:
        return problem
    if os.environ.get("RANK", "0") not in ("", "0"):
        return None  # torchrun's other ranks share rank 0's run dir, which rank 0 may hold already
    given = given_values(argv)
    busy = []
    if key == "hydra.run.dir" and "${" not in given.get(key, "${"):
        busy.append((Path(given[key]), False))
    resumed = resumed_run_dir(given)
    if resumed is not None:
        busy.append((resumed, True))
    for run_dir, resuming in busy:
        record = holder(run_dir)
        if record is not None:
            return _busy_message(run_dir, record, resuming)
    return None


def given_values(argv: list[str]) -> dict[str, str]:
    """The command line's ``key=value`` overrides (``+``/``~`` prefixes dropped)."""
    return dict(arg.lstrip("+~").partition("=")[::2] for arg in argv if "=" in arg and not arg.startswith("-"))


def resumed_run_dir(given: dict[str, str]) -> Path | None:
    """The run dir that ``resume=<run dir or checkpoint>`` continues (mode=train), or None."""
    if not given.get("resume") or given.get("mode", "train") != "train" or "${" in given["resume"]:
        return None
    resume = Path(given["resume"])
    return resume if resume.is_dir() else resume.parent


def resume_in_its_run_dir(argv: list[str]) -> list[str]:
    """``python train.py resume=<run dir or checkpoint>`` (one run, no ``hydra.run.dir``): Hydra's run dir
    becomes the resumed run's, so this session's log is appended to its ``train.log`` rather than to a
    fresh ``outputs/<date>/<time>/``; ``hydra.output_subdir=null`` leaves the run's ``.hydra/`` as it was."""
    arguments = argv[1:]
    given = given_values(arguments)
    resumed = resumed_run_dir(given)
    if any(arg in ("-m", "--multirun") for arg in arguments) or "hydra.run.dir" in given or resumed is None or not resumed.is_dir():
        return argv  # a missing checkpoint is reported by the run, with its key
    quoted = str(resumed).replace("\\", "\\\\").replace("'", "\\'")
    return [*argv, f"hydra.run.dir='{quoted}'", "hydra.output_subdir=null"]


# --- the lock file -------------------------------------------------------------------------


def _acquire(run_dir: Path, resuming: bool) -> int:
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise ConfigError(
            f"run dir {run_dir}: cannot write there ({error.strerror or error}); "
            + ("copy the run dir to a folder you can write and resume from there" if resuming
               else "set hydra.run.dir to a folder you can write")
        ) from None
    for attempt in range(5):  # a few tries: holder() of another process's preflight holds a shared lock for microseconds
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(descriptor)
                raise
            if attempt == 4:
                os.close(descriptor)
                raise ConfigError(_busy_message(run_dir, _record(path), resuming)) from None
            time.sleep(0.02)
    previous = _record(path)
    if previous:
        log.info("run dir %s: the run that held it (pid %s on %s) has ended; this run owns it now",
                 run_dir, previous.get("pid"), previous.get("host"))
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:300],
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode(), 0)
    return descriptor


def _release(descriptor: int) -> None:
    try:
        os.ftruncate(descriptor, 0)  # emptied before unlocking: a record in a free file means a run that died
    except OSError:
        pass
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    os.close(descriptor)


def _record(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _busy_message(run_dir: Path, record: dict, resuming: bool) -> str:
    pid = record.get("pid", "?")
    who = (
        f"pid {pid} on {record.get('host', '?')}, since {record.get('since', '?')}: {record.get('command', '?')}"
        if record else "details not written yet"
    )
    if resuming:
        fix = f"wait for it to finish, or stop it (kill {pid} on {record.get('host', 'its host')}), then resume"
    else:
        fix = f"set another hydra.run.dir, or wait for pid {pid} to finish (kill {pid} stops it)"
    return f"run dir {run_dir} belongs to a run that is still live ({who}); {fix}"
