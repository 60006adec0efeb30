"""Keep freed memory inside a CPU training process, so each step reuses its blocks instead of faulting them in.

glibc's malloc serves a block above its mmap threshold (128 KB to begin with) with a fresh ``mmap`` and returns
the heap's free top to the system above its trim threshold. A training step allocates and frees tens of MB
of activations and gradients; each step then touches new pages, and every first touch of a 4 KB page is a
page fault (several microseconds in a virtual machine). ``reuse_freed_memory`` raises both thresholds, so
blocks up to 32 MB come from the heap and freed ones stay there: the process's resident memory stays at its
peak (which it reaches anyway) and later steps fault nothing in. Only glibc on Linux has these knobs; any
other C library is left as it is.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses more on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # never give the heap's free top back while training


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # musl and others have no such function
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when both were applied."""
    libc = _glibc()
    if libc is None:
        log.debug("train.reuse_freed_memory: not glibc on Linux, malloc left as it is")
        return False
    applied = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    applied = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and applied
    return applied
