"""trainer.keep_freed_memory: glibc's malloc keeps what a step frees, so the next step takes no page faults."""
from __future__ import annotations

import subprocess
import sys

import pytest

import segtrain.build
from conftest import REPO, TINY, compose_config
from segtrain.host_memory import GLIBC

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


def test_build_applies_it_unless_switched_off(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(segtrain.build, "keep_freed_memory", lambda: calls.append(True) or True)
    with caplog.at_level("INFO", logger="segtrain.build"):
        segtrain.build.build(compose_config(TINY))
    assert calls == [True]
    assert "freed memory is kept" in caplog.text
    segtrain.build.build(compose_config([*TINY, "trainer.keep_freed_memory=false"]))
    assert calls == [True]
