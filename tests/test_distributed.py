"""Many devices, one run: DDP on the CPU with gloo (spawned from train.py, and under torchrun)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import segtrain.run
from conftest import REPO, TINY, compose_config
from segtrain.checkpoint import load_checkpoint
from segtrain.distributed import prepare_torchrun_argv

# GroupNorm (no batch statistics that would differ per process), no schedule (the resumed
# run has more epochs than its first part), no pictures.
DDP_TINY = [  # unweighted CE: the per-process means then average to the single process's mean exactly (docs/losses.md)
    *TINY, "model.norm=group", "scheduler=none", "optimizer.lr=0.01", "dataset.train_samples=32",
    "dataset.val_samples=8", "trainer.log_images=0", "loss.weight=null",
]


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # on a shared 2-core machine torch's default threads thrash


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}


@pytest.mark.slow  # spawns two workers twice
def test_two_gloo_processes_match_one_process_and_resume(tmp_path, capfd):
    torch.set_num_threads(1)
    single = compose_config([*DDP_TINY, "dataset.batch_size=8", "trainer.max_epochs=2"])
    best_single = segtrain.run.main(single, tmp_path / "single")

    # The same global batch of 8 as 2 processes x 4, trained one epoch, then resumed for the second.
    ddp = [*DDP_TINY, "dataset.batch_size=4", "trainer.cpu_processes=2", "trainer.sync_bn=true", "trainer.dist_timeout=60"]
    segtrain.run.main(compose_config([*ddp, "trainer.max_epochs=1"]), tmp_path / "ddp")
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["finished"] is True
    best_ddp = segtrain.run.main(compose_config([*ddp, "trainer.max_epochs=2", f"resume={tmp_path / 'ddp'}"]), tmp_path / "ignored")

    weights_single = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    weights_ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")["model"]
    assert weights_single.keys() == weights_ddp.keys()
    for name, value in weights_single.items():
        torch.testing.assert_close(weights_ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)
    metrics_single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    metrics_ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics_ddp["steps"] == metrics_single["steps"] == 8 and metrics_ddp["finished"] is True
    assert best_ddp == pytest.approx(best_single, abs=1e-6)
    for key in ("mIoU", "acc", "dice"):
        assert metrics_ddp["final"][key] == pytest.approx(metrics_single["final"][key], abs=1e-6), key
    assert metrics_ddp["final"]["loss"] == pytest.approx(metrics_single["final"]["loss"], rel=1e-4), "val loss over the whole split"
    assert len(list((tmp_path / "ddp").glob("events.out.tfevents.*"))) == 2, "rank 0 alone writes TensorBoard (one file per session)"

    output = capfd.readouterr().out
    assert "global batch 8" in output and "SyncBatchNorm runs on CUDA only" in output


@pytest.mark.slow
def test_killing_one_rank_ends_the_run_with_its_error(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*DDP_TINY, "dataset.batch_size=4", "trainer.cpu_processes=2", "trainer.max_epochs=1000", "trainer.dist_timeout=30"]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
    )
    try:
        deadline = time.monotonic() + 120
        while "optimizer steps" not in (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else True:
            assert process.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        workers = [pid for pid in children(process.pid) if b"spawn_main" in cmdline(pid) and b"resource_tracker" not in cmdline(pid)]
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert time.monotonic() - killed < 30, "the run ended within trainer.dist_timeout"
    assert process.returncode != 0
    assert "was killed by SIGKILL; the other ranks were stopped" in output, output[-3000:]
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}") and b"spawn_main" in cmdline(pid)], "no rank is left behind"


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_share_one_run_dir(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    overrides = [*DDP_TINY, "dataset.batch_size=4", "trainer.max_epochs=1", "trainer.dist_timeout=60"]
    nodes = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc-per-node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=twonodes", str(REPO / "train.py"), *overrides,
            ],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    run_dirs = list((tmp_path / "outputs").glob("**/metrics.json"))
    assert [path.parent for path in run_dirs] == [tmp_path / "outputs" / "torchrun" / "twonodes"], run_dirs
    run_dir = run_dirs[0].parent
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1, "one TensorBoard writer"
    assert json.loads((run_dir / "metrics.json").read_text())["finished"] is True
    assert "global batch 8" in "".join(outputs)
    assert [path.parent for path in tmp_path.glob("outputs/**/.hydra")] == [run_dir], "rank 0 alone writes .hydra/"


def test_multirun_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit, match="-m under torchrun"):
        prepare_torchrun_argv(["train.py", "-m", "optimizer.lr=0.1,0.01"])
    argv = prepare_torchrun_argv(["train.py", "optimizer.lr=0.1"])
    assert "hydra.run.dir=outputs/torchrun/abc" in argv and "hydra.output_subdir=null" in argv
    assert prepare_torchrun_argv(["train.py", "hydra.run.dir=x"]).count("hydra.run.dir=x") == 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(SystemExit, match="--rdzv-id"):
        prepare_torchrun_argv(["train.py"])


def test_cpu_processes_need_the_cpu():
    from segtrain.errors import ConfigError
    from segtrain.distributed import process_count

    assert process_count(compose_config([*TINY, "trainer.cpu_processes=3"])) == 3
    with pytest.raises(ConfigError, match="trainer.cpu_processes=2 with device_list=\\[0, 1\\]"):
        process_count(compose_config(["device_list=[0,1]", "trainer.cpu_processes=2"]))
    assert process_count(compose_config(["device_list=[0,1,2,3]"])) == 4
