"""Every user mistake is one line and exit code 1, not a traceback: a full disk or an unwritable dir while
saving, a truncated checkpoint, a file that is no checkpoint, a symbolic link loop or JPEG masks in a data
folder, an ignore index that is a class. Real bugs keep their traceback."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY, run_train_py
from segtrain.audit import check_ignore_index
from segtrain.checkpoint import load_checkpoint, save_checkpoint
from segtrain.errors import ConfigError, TrainingError
from test_folder_dataset import write_pairs

QUICK = [*TINY, "trainer.max_epochs=1", "dataset.train_samples=16", "trainer.log_images=0"]

# train.py as a user runs it, where each write of last.pt once the run dir holds last.pt and best.pt goes to
# /dev/full: the kernel's own "No space left on device", through torch.save's writer.
FULL_DISK = """
import os, runpy, sys, tempfile
real_mkstemp = tempfile.mkstemp
def mkstemp(*args, **kwargs):
    handle, name = real_mkstemp(*args, **kwargs)
    folder = os.path.dirname(name)
    if os.path.basename(name).startswith(".last.pt.") and all(os.path.exists(os.path.join(folder, f)) for f in ("last.pt", "best.pt")):
        os.close(handle)
        handle = os.open("/dev/full", os.O_WRONLY)
    return handle, name
tempfile.mkstemp = mkstemp
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

BUG = """
import runpy, sys
import segtrain.run
def main(cfg, run_dir):
    return {}["a real bug"]
segtrain.run.main = main
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_with(driver: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """train.py ARGS started through ``driver`` (a script that patches one thing, then runs train.py)."""
    return subprocess.run(
        [sys.executable, "-c", driver, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **env},
    )


def error_line(process: subprocess.CompletedProcess) -> str:
    """The one error line a user reads; fails unless there is exactly one, exit code 1 and no traceback."""
    output = process.stdout + process.stderr
    assert process.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "[ERROR]" in line or line.startswith("segtrain: ")]
    assert len(errors) == 1, output[-3000:]
    return errors[0].split("[ERROR] - ", 1)[-1].removeprefix("segtrain: ")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished one-epoch run (last.pt and best.pt), made once; copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    process = run_train_py([f"hydra.run.dir={run_dir}", *QUICK])
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns(".segtrain.lock")))


# --- saving --------------------------------------------------------------------------------


def test_a_full_disk_while_saving_is_one_line_and_the_previous_last_pt_is_intact(tmp_path):
    run_dir = tmp_path / "run"
    # Epoch 1 (two steps) writes last.pt and best.pt; a later write of last.pt meets the full disk.
    process = run_with(FULL_DISK, [f"hydra.run.dir={run_dir}", *QUICK, "trainer.max_epochs=2"])
    assert error_line(process) == (
        f"no space left on device while writing {run_dir / 'last.pt'}; the previous last.pt is intact. Free space on that "
        f"disk (or move the run dir to a larger one), then continue with resume={run_dir}"
    )
    assert load_checkpoint(run_dir / "last.pt")["state"]["step"] == 2, "epoch 1's last.pt, as it was saved"
    assert not list(run_dir.glob(".*.tmp")), "the partial file is removed"


def test_save_errors_name_the_file_and_what_is_left(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    real_mkstemp = tempfile.mkstemp

    def full_disk(*args, **kwargs):
        handle, name = real_mkstemp(*args, **kwargs)
        os.close(handle)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    for size in (10, 3_000_000):  # torch.save raises the OSError itself (small) or a RuntimeError around it (large)
        with pytest.raises(TrainingError, match=rf"^no space left on device while writing {path}; no last.pt was written\."):
            save_checkpoint(path, {"model": {"weight": torch.ones(size)}})
    monkeypatch.undo()
    save_checkpoint(path, {"step": 1})

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(TrainingError, match=rf"^cannot write {path} \(Read-only file system\): the run dir {tmp_path} is read-only "
                                            r"or not yours; the previous last.pt is intact\. Train into a folder you can write"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_stale_temporary_files_of_a_killed_save_are_removed_at_the_next_save(tmp_path):
    path = tmp_path / "last.pt"
    stale = tmp_path / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    writing = tmp_path / ".last.pt.wr1t1ng.tmp"  # a save in progress (its writer holds it)
    writing.write_bytes(b"being written")
    other = tmp_path / ".best.pt.0ther.tmp"  # another file's temporary: not this save's business
    other.write_bytes(b"x")
    with open(writing, "rb") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        save_checkpoint(path, {"step": 1})
        assert not stale.exists() and writing.exists() and other.exists()
    save_checkpoint(path, {"step": 2})
    assert not writing.exists() and load_checkpoint(path)["step"] == 2


# --- reading checkpoints -------------------------------------------------------------------


def test_a_truncated_last_pt_names_best_pt(trained_run, tmp_path):
    run_dir = copy_of(trained_run, tmp_path)
    whole = (run_dir / "last.pt").read_bytes()
    (run_dir / "last.pt").write_bytes(whole[: len(whole) // 2])
    process = run_train_py([f"hydra.run.dir={tmp_path / 'log'}", *QUICK, f"resume={run_dir}"])
    message = error_line(process)
    assert f"{run_dir / 'last.pt'}: the file is truncated or corrupt ({len(whole) // 2} bytes; " in message
    assert message.endswith(f"; {run_dir / 'best.pt'} looks intact: resume={run_dir / 'best.pt'}")


@pytest.mark.parametrize("key", ["resume", "+model.init_from"])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, key):
    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(picture)
    notes = tmp_path / "notes.pt"
    notes.write_text("these are not weights\n")
    given = picture if key == "resume" else notes
    process = run_train_py([f"hydra.run.dir={tmp_path / 'run'}", *QUICK, f"{key}={given}"])
    kind = "a PNG image" if key == "resume" else "a text file"
    assert f"{given}: not a PyTorch checkpoint but {kind}; give a checkpoint that train.py wrote" in error_line(process)


def test_load_checkpoint_says_what_the_file_is(tmp_path):
    save_checkpoint(tmp_path / "best.pt", {"model": {"weight": torch.ones(4)}, "state": {}})
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    torch.save({"conv.weight": torch.ones(3)}, tmp_path / "state_dict.pt")
    cases = {
        "empty.pt": f"resume={tmp_path / 'empty.pt'}: the file is truncated or corrupt (0 bytes; EOFError); "
                    f"{tmp_path / 'best.pt'} looks intact: resume={tmp_path / 'best.pt'}",
        "tensor.pt": f"resume={tmp_path / 'tensor.pt'}: holds a Tensor, not a segtrain checkpoint",
        "state_dict.pt": f"resume={tmp_path / 'state_dict.pt'}: a bare state_dict (1 tensors), not a segtrain checkpoint; "
                         "to start from these weights save them as torch.save({'model': state_dict}, 'weights.pt')",
        "missing.pt": f"resume={tmp_path / 'missing.pt'}: no such file",
        "": f"resume={tmp_path}: a folder; give a checkpoint file",
    }
    for name, expected in cases.items():
        with pytest.raises(ConfigError) as error:
            load_checkpoint(tmp_path / name, key="resume")
        assert str(error.value).startswith(expected) and "\n" not in str(error.value), str(error.value)
    assert load_checkpoint(tmp_path / "best.pt")["model"]["weight"].sum() == 4


# --- data folders --------------------------------------------------------------------------


def folder_args(root: Path, run_dir: Path) -> list[str]:
    return ["dataset=folder", f"dataset.root={root}", "dataset.train_images=images", "dataset.train_masks=masks",
            "dataset.num_classes=2", "dataset.mask_values=[0,255]", "dataset.num_workers=0", "dataset.size=32",
            "device_list=[]", "trainer.progress_bar=false", "trainer.log_images=0", "model.width=4", "model.depth=2",
            "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]


def test_a_symbolic_link_loop_in_a_data_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    write_pairs(tmp_path / "data", count=4)
    loop = tmp_path / "data" / "masks" / "s3.png"
    loop.unlink()
    loop.symlink_to("s3.png")  # itself
    process = run_train_py(folder_args(tmp_path / "data", tmp_path / "run"))
    assert error_line(process) == (
        f"dataset.train_masks: {loop} is a symbolic link loop ({loop} -> s3.png); point the link at a real file or folder, or remove it"
    )


def test_jpeg_masks_are_refused_jpeg_images_are_fine(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    write_pairs(tmp_path / "data", count=4, image_ext=".jpg")
    for mask in sorted((tmp_path / "data" / "masks").glob("s[01].png")):
        Image.open(mask).save(mask.with_suffix(".jpg"))
        mask.unlink()
    process = run_train_py(folder_args(tmp_path / "data", tmp_path / "run"))
    assert error_line(process) == (
        f"dataset.train_masks: masks must be lossless (PNG, TIFF or BMP); {tmp_path / 'data' / 'masks' / 's0.jpg'} is JPEG "
        f"(and 1 more in {tmp_path / 'data' / 'masks'}): its compression changes label values at every edge. "
        "Re-export the masks as PNG from their source"
    )


# --- the config ----------------------------------------------------------------------------


def test_an_ignore_index_that_is_a_class_is_refused_with_its_name():
    with pytest.raises(ConfigError) as error:
        check_ignore_index(3, 0, ["background", "cat", "dog"])
    assert str(error.value).startswith(
        "dataset.ignore_index=0 is class 'background' (dataset.num_classes=3): its pixels would be left out of the loss and "
        "the metrics, never learned. Set dataset.ignore_index to a value that is no class (e.g. 255, or null to ignore nothing)"
    )
    with pytest.raises(ConfigError, match="dataset.ignore_index=2 is class 2 "):
        check_ignore_index(3, 2, None)
    for num_classes, ignore_index in ((3, None), (3, 255), (2, 3), (21, -100), (19, 255)):
        check_ignore_index(num_classes, ignore_index, None)


def test_train_py_refuses_an_ignore_index_that_is_a_class(tmp_path):
    process = run_train_py([f"hydra.run.dir={tmp_path / 'run'}", *QUICK, "dataset.ignore_index=1"])
    assert error_line(process).startswith("dataset.ignore_index=1 is class 'ellipse' (dataset.num_classes=4)")


# --- tracebacks stay for bugs --------------------------------------------------------------


def test_a_real_bug_keeps_its_traceback_and_hydra_full_error_shows_one_for_user_errors(tmp_path):
    bug = run_with(BUG, [f"hydra.run.dir={tmp_path / 'bug'}", *QUICK])
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'a real bug'" in bug.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("no checkpoint\n")
    full = run_with("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                    [f"hydra.run.dir={tmp_path / 'full'}", *QUICK, f"resume={notes}"], HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError" in full.stderr and "not a PyTorch checkpoint" in full.stderr
