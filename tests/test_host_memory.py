"""trainer.keep_freed_memory (CPU training): glibc's malloc keeps what a step frees, so the next step takes no page faults."""
from __future__ import annotations

import subprocess
import sys

import pytest

import segtrain.build
import segtrain.run
from conftest import REPO, TINY, compose_config
from segtrain import host_memory
from segtrain.host_memory import GLIBC, keep_freed_memory_for_cpu_training

# Five "steps" that each allocate and touch 10 blocks of 8 MiB, then free them all, as a training
# step does with its activations; prints the page faults (ru_minflt) the five took.
STEPS = """
import resource, sys
import torch
sys.path.insert(0, {repo!r})
from segtrain.host_memory import keep_freed_memory
if {keep}:
    assert keep_freed_memory()
def step():
    blocks = [torch.ones(2 * 2**20) for _ in range(10)]
    del blocks
step()  # the first step grows the heap either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_STEP = 10 * 8 * 2**20 // 4096


def page_faults(keep: bool) -> int:
    process = subprocess.run(
        [sys.executable, "-c", STEPS.format(repo=str(REPO), keep=keep)], capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 0, process.stderr
    return int(process.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt settings exist only in glibc (Linux)")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = page_faults(keep=False), page_faults(keep=True)
    # With glibc's defaults the freed blocks go back to the kernel and come back as fresh pages:
    # every page of every step here (102,252 faults), or in some runs (heap placement) about one
    # step's worth. Kept, the five steps reuse the heap: at most a fraction of one block.
    assert kept < PAGES_PER_STEP / 4, (kept, default)
    assert default > 4 * kept, (kept, default)


def test_applied_for_cpu_training_only_once_and_unless_switched_off(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(host_memory, "_applied", False)
    assert not keep_freed_memory_for_cpu_training("cuda", True)  # activations live on the GPU: nothing to gain
    assert not keep_freed_memory_for_cpu_training("cpu", False)  # trainer.keep_freed_memory=false
    assert calls == []
    with caplog.at_level("INFO", logger="segtrain.host_memory"):
        assert keep_freed_memory_for_cpu_training("cpu", True)
        assert keep_freed_memory_for_cpu_training("cpu", True)
    assert calls == [True] and caplog.text.count("malloc keeps freed memory") == 1


def test_a_cpu_training_run_applies_it_and_build_does_not(monkeypatch, tmp_path, caplog):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(host_memory, "_applied", False)
    segtrain.build.build(compose_config(TINY))
    assert calls == []  # building objects changes no process-wide setting
    with caplog.at_level("INFO", logger="segtrain.host_memory"):
        segtrain.run.train(compose_config([*TINY, "trainer.max_epochs=1", "trainer.log_images=0"]), tmp_path)
    assert calls == [True] and "trainer.keep_freed_memory=true" in caplog.text
