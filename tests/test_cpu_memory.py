"""Freed memory kept in the process while a CPU trains: page faults counted, not assumed."""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys

import pytest
from torch.utils.data import DataLoader

from groundup.train import cpu_memory
from groundup.train.loop import TrainHooks, fit
from tests.conftest import ROOT
from tests.test_train import progressions, settings, tiny_model

pytestmark = pytest.mark.skipif(not cpu_memory.supported(), reason="needs glibc's malloc (Linux)")

SIZE = 64 << 20  # over glibc's largest mmap threshold (32 MB): by default every such block is mapped afresh
PAGES = SIZE // 4096


def faults_of_a_second_block() -> int:
    """Page faults of writing a 64 MB block after one of the same size was written and freed. glibc's own
    malloc is called directly: torch's tensors would interleave small allocations of their own."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def write_and_free() -> None:
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        libc.free(block)

    write_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    write_and_free()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def rss_mb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 >> 20


def test_freed_memory_is_reused_inside_and_given_back_after():
    assert faults_of_a_second_block() > PAGES * 0.9  # glibc's default: every page faulted in again
    with cpu_memory.freed_memory_kept() as kept:
        assert kept and cpu_memory.is_kept()
        assert faults_of_a_second_block() < PAGES * 0.05
        with cpu_memory.freed_memory_kept():  # a second holder (another task's training) shares it
            pass
        assert cpu_memory.is_kept()
        held = rss_mb()
    assert not cpu_memory.is_kept()
    assert rss_mb() < held - 32  # the kept 64 MB went back to the system
    assert faults_of_a_second_block() > PAGES * 0.9
    with cpu_memory.freed_memory_kept(enabled=False) as kept:
        assert not kept and not cpu_memory.is_kept()


def test_off_the_main_thread_large_blocks_are_mapped_afresh_whatever_the_setting():
    # Why a CPU training run started on a worker thread moves to a process of its own (loop.needs_own_process):
    # glibc's per-thread arenas serve blocks over 64 MB by mmap even with mmap switched off.
    import threading

    faults: list[int] = []
    with cpu_memory.freed_memory_kept():
        assert faults_of_a_second_block() < PAGES * 0.05
        worker = threading.Thread(target=lambda: faults.append(faults_of_a_second_block()))
        worker.start()
        worker.join()
    assert cpu_memory.on_main_thread()  # pytest runs tests on the main thread
    assert faults[0] > PAGES * 0.9


def test_a_process_started_with_the_environment_keeps_freed_memory():
    # LitGPT's finetuning subprocess gets the setting this way: glibc reads it when the process starts.
    def faults(env: dict[str, str]) -> int:
        probe = "from tests.test_cpu_memory import faults_of_a_second_block as f; print(f())"
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert faults(plain) > PAGES * 0.9
    assert faults({**plain, **cpu_memory.environment()}) < PAGES * 0.05


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_training_keeps_freed_memory_only_while_it_runs(tmp_path, keep):
    seen: list[bool] = []
    loader = DataLoader(progressions(), batch_size=4, shuffle=True, drop_last=True)
    config = settings(max_steps=3, runtime={"accelerator": "cpu", "keep_freed_memory": keep})
    hooks = TrainHooks(on_progress=lambda done, total: seen.append(cpu_memory.is_kept()))
    fit(tiny_model(), loader, None, config, tmp_path / "run", hooks=hooks)
    assert seen == [keep] * 3
    assert not cpu_memory.is_kept()
