"""A run owns its run dir: a second live run into it is refused naming the live one; the lock goes
with its process however that ends (kill -9 included); the default run dirs differ per launch."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY, compose_config, run_train_py
from segtrain.errors import ConfigError
from segtrain.run_lock import LOCK_NAME, holder, owning, preflight_message

HOLD = "import sys, time; from segtrain.run_lock import owning\nwith owning(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n"


def hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    """A live process holding ``run_dir``'s lock (as a running train.py would)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def test_a_second_live_run_is_refused_naming_the_dir_the_run_and_the_fix(tmp_path):
    run_dir = tmp_path / "run"
    live = hold_in_another_process(run_dir)
    try:
        with pytest.raises(ConfigError) as refused:
            with owning(run_dir):
                pass
        message = str(refused.value)
        assert "\n" not in message
        assert f"run dir {run_dir} belongs to a run that is still live (pid {live.pid} on {socket.gethostname()}, since " in message
        assert "-c" in message, "the live run's command line"
        assert message.endswith(f"set another hydra.run.dir, or wait for pid {live.pid} to finish (kill {live.pid} stops it)")
        assert holder(run_dir)["pid"] == live.pid
        with pytest.raises(ConfigError, match=rf"wait for it to finish, or stop it \(kill {live.pid} on .*\), then resume"):
            with owning(run_dir, resuming=True):
                pass
    finally:
        kill(live)


def test_a_lock_left_by_a_killed_run_is_free(tmp_path):
    run_dir = tmp_path / "run"
    kill(hold_in_another_process(run_dir))
    assert (run_dir / LOCK_NAME).read_text(), "the dead run's record is still in the file"
    assert holder(run_dir) is None
    with owning(run_dir):
        assert holder(run_dir) is None or holder(run_dir)["pid"] == os.getpid()
        probe = subprocess.run([sys.executable, "-c", "from segtrain.run_lock import holder; import sys; print(holder(sys.argv[1])['pid'])",
                                str(run_dir)], cwd=REPO, capture_output=True, text=True)
        assert probe.stdout.strip() == str(os.getpid()), probe.stderr


def test_released_on_exit_and_on_an_exception_and_nested_in_one_process(tmp_path):
    run_dir = tmp_path / "run"
    with owning(run_dir):
        with owning(run_dir):  # the same process again (e.g. train() inside main()): not a second run
            pass
        assert subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(run_dir)], cwd=REPO,
                              capture_output=True, timeout=60).returncode == 1, "still held after the nested exit"
    with pytest.raises(ZeroDivisionError):
        with owning(run_dir):
            1 / 0
    finished = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(run_dir)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0 and finished.stdout.strip() == "held", finished.stderr
    assert (run_dir / LOCK_NAME).read_text() == "", "a released lock keeps no record"


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert preflight_message([f"hydra.run.dir={tmp_path / 'file' / 'run'}"]) == (
        f"hydra.run.dir={tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a folder; give hydra.run.dir a folder you can write"
    )
    with pytest.raises(ConfigError, match=f"run dir {tmp_path / 'file' / 'run'}: cannot write there"):
        with owning(tmp_path / "file" / "run"):
            pass
    assert preflight_message([f"hydra.run.dir={tmp_path / 'new' / 'run'}"]) is None
    assert preflight_message(["--help", f"hydra.run.dir={tmp_path / 'file' / 'run'}"]) is None
    assert not (tmp_path / "new").exists(), "the check creates nothing"


def test_the_default_run_dirs_differ_per_launch():
    from hydra import compose, initialize_config_dir

    from conftest import CONFIGS

    dirs = []
    for _ in range(2):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            hydra = compose(config_name="train", return_hydra_config=True).hydra
            dirs.append((hydra.run.dir, hydra.sweep.dir))
    assert dirs[0][0] != dirs[1][0] and dirs[0][1] != dirs[1][1], dirs
    assert dirs[0][0].startswith("outputs/") and len(dirs[0][0].rsplit("/", 1)[1]) == len("10-00-00-123456")


def output_of(process: subprocess.CompletedProcess) -> str:
    return process.stdout + process.stderr


def test_train_py_into_a_live_runs_dir_fails_at_once_and_writes_nothing_there(tmp_path):
    run_dir = tmp_path / "run"
    live = hold_in_another_process(run_dir)
    try:
        process = run_train_py([f"hydra.run.dir={run_dir}", *TINY])
        resumed = run_train_py([f"hydra.run.dir={tmp_path / 'other'}", *TINY, f"resume={run_dir}"])
    finally:
        kill(live)
    assert process.returncode == 1 and "Traceback" not in output_of(process)
    assert process.stderr.strip() == process.stderr.strip().splitlines()[0], "one line"
    assert process.stderr.startswith(f"segtrain: run dir {run_dir} belongs to a run that is still live (pid {live.pid} on ")
    assert sorted(path.name for path in run_dir.iterdir()) == [LOCK_NAME], "no .hydra/ or train.log written into the live run's dir"
    assert resumed.returncode == 1 and "Traceback" not in output_of(resumed)
    assert resumed.stderr.startswith(f"segtrain: run dir {run_dir} belongs to a run that is still live (pid {live.pid} on ")
    assert "then resume" in resumed.stderr and not (tmp_path / "other").exists()


def test_the_run_itself_holds_its_dir_while_it_trains(tmp_path):
    """A train.py started while another is inside its run (past the pre-flight check) is refused by the lock."""
    import time

    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *TINY, "trainer.max_epochs=200"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"})
    record, deadline = None, time.monotonic() + 120
    try:
        # Until the lock shows (200 epochs keep the run alive; a first epoch can end between two looks).
        while record is None and first.poll() is None and time.monotonic() < deadline:
            record = holder(run_dir)
            time.sleep(0.2)
        assert record is not None and record["pid"] == first.pid, "train.py held no lock on its run dir"
    finally:
        kill(first)
    assert holder(run_dir) is None


read_only_mounts = shutil.which("unshare") is not None and subprocess.run(
    ["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True
).returncode == 0


@pytest.mark.skipif(not read_only_mounts, reason="needs unshare -rm (a private mount namespace) to mount a read-only dir")
def test_a_read_only_run_dir_is_one_line_before_any_work(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    script = (
        f"mount --bind {read_only} {read_only} && mount -o remount,bind,ro {read_only} && "
        f"exec {sys.executable} {REPO / 'train.py'} hydra.run.dir={read_only / 'run'} {' '.join(TINY)}"
    )
    process = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"})
    assert process.returncode == 1 and "Traceback" not in output_of(process), output_of(process)[-3000:]
    assert process.stderr.strip() == (
        f"segtrain: hydra.run.dir={read_only / 'run'}: cannot write in {read_only} (Read-only file system); "
        "give hydra.run.dir a folder you can write (e.g. under your home directory)"
    )
