"""Tune glibc's allocator for a process that frees and reallocates tens-of-MB buffers every round.

Every round a peer allocates and frees wire buffers of ~22 MB (encoded frames, received messages,
decoded tensors). With glibc's defaults each free either returns the mapping to the kernel (the
dynamic mmap threshold, 128 KiB to 32 MiB) or trims the heap top (``M_TRIM_THRESHOLD``, 128 KiB),
and the next round page-faults the same memory back in, which makes every large copy several
times slower than memory bandwidth allows. Keeping big blocks on the heap and never trimming
trades resident memory (the process keeps its high-water mark) for copies that run at memory
bandwidth.

The environment variables ``MALLOC_MMAP_THRESHOLD_=268435456`` and
``MALLOC_TRIM_THRESHOLD_=1073741824`` do the same from the first allocation and are what the
launch scripts set; :func:`tune_allocator` is for processes started without them (the ``p2pdl``
command calls it first thing, and library users and benchmarks can too). On a libc other than
glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Final

__all__ = ["tune_allocator"]

log = logging.getLogger(__name__)

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD: Final[int] = -1
_M_MMAP_THRESHOLD: Final[int] = -3

# Blocks below 256 MiB come from the heap; the heap top is trimmed only past 1 GiB free.
MMAP_THRESHOLD_BYTES: Final[int] = 256 * 1024 * 1024
TRIM_THRESHOLD_BYTES: Final[int] = 1024 * 1024 * 1024


def tune_allocator() -> bool:
    """Apply the thresholds above with ``mallopt``; returns whether glibc accepted both.

    Settings already given by the environment win: glibc reads them at start-up, and this leaves
    them alone so an operator can still override either one.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    accepted = True
    for param, env_name, value in (
        (_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", TRIM_THRESHOLD_BYTES),
    ):
        if os.environ.get(env_name):
            continue
        # mallopt returns 1 on success and 0 on error (e.g. a value over glibc's maximum).
        if mallopt(param, value) != 1:
            accepted = False
            log.debug("mallopt(%d, %d) was refused", param, value)
    return accepted
