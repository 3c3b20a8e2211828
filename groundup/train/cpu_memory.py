"""Keeping freed memory in the process while a CPU trains (glibc's ``malloc``, i.e. Linux).

glibc serves every block over 32 MB with a fresh ``mmap`` and returns it to the system when it is freed.
A training step frees and reallocates the same large temporaries every time: the logits
(batch x tokens x 50257 floats), their log-softmax and gradients, and the embedding's gradient. So
every step page-faults several hundred MB in again, 4 KiB at a time; on the 124M model that was ~200,000
faults and 0.4 s of kernel time a step here (``python -m bench.allocator``). With mmap off and trimming
deferred, freed blocks stay in the process and the next step reuses them without a fault.

``mallopt`` takes effect for allocations made after the call, so this can be switched on for the span of
a training run (:func:`freed_memory_kept`) and off again afterwards, when the kept memory is given back
with ``malloc_trim``. A process started fresh can get the same through glibc's environment variables
(:func:`environment`; LitGPT's finetuning subprocess gets them that way).

Setting any of these options turns off glibc's dynamic mmap threshold for the rest of the process. On
exit the thresholds are set to where that dynamic threshold settles once a block of 32 MB or more has been
freed (32 MB for mmap, 64 MB for trimming), which a PyTorch process reaches within its first steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import platform
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

# mallopt parameters (<malloc.h>)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
_KEPT = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 1 << 30}
# glibc's defaults for mmap count and top pad, and the steady state of its dynamic thresholds.
_RELEASED = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20, M_TOP_PAD: 128 << 10}
# The same options as glibc reads them from the environment when a process starts.
_ENVIRONMENT = {
    f"MALLOC_{name}_": str(_KEPT[option])
    for name, option in (("MMAP_MAX", M_MMAP_MAX), ("TRIM_THRESHOLD", M_TRIM_THRESHOLD), ("TOP_PAD", M_TOP_PAD))
}

_lock = threading.Lock()
_holders = 0  # training runs in this process inside freed_memory_kept (Prefect runs tasks in threads)


@functools.cache  # platform.libc_ver() reads the Python executable
def supported() -> bool:
    """Whether this process allocates with glibc, the only allocator these options exist for."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def on_main_thread() -> bool:
    """Whether this is the process's main thread, the one whose large blocks these options keep. glibc
    gives other threads arenas of their own, which serve any block over 64 MB with ``mmap`` and unmap it
    when it is freed, whatever ``mallopt`` says; a training run off the main thread is moved to a process
    of its own instead (:func:`groundup.train.loop.needs_own_process`)."""
    return threading.current_thread() is threading.main_thread()


def is_kept() -> bool:
    """Whether freed memory is kept right now (a training run is inside :func:`freed_memory_kept`)."""
    return _holders > 0


def environment() -> dict[str, str]:
    """The same options as environment variables, for a process about to start (empty where unsupported)."""
    return dict(_ENVIRONMENT) if supported() else {}


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True) -> Iterator[bool]:
    """Keep freed memory in the process inside the block; yields whether it does. Nested or concurrent
    holders share one setting, released when the last one leaves. Without glibc it does nothing."""
    global _holders
    if not (enabled and supported()):
        yield False
        return
    libc = ctypes.CDLL(None)
    with _lock:
        if _holders == 0:
            _set(libc, _KEPT)
        _holders += 1
    try:
        yield True
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _set(libc, _RELEASED)
                libc.malloc_trim(0)


def _set(libc: ctypes.CDLL, options: dict[int, int]) -> None:
    for option, value in options.items():
        if libc.mallopt(option, value) != 1:  # 1 on success; a refusal only costs the speed-up
            log.warning("glibc refused mallopt(%d, %d)", option, value)
