"""Give the heap that a burst of work freed back to the operating system.

A batch of 16 images allocates and frees hundreds of MB of small and medium blocks (PNG
encoding, previews, per-step tensors below glibc's mmap threshold) in several threads. glibc
keeps freed blocks in each thread's malloc arena, and a fragmented arena is returned to the
OS only by `malloc_trim`, so after a burst the idle RSS stays up and depends on how the
arenas happened to fragment (measured in CI: +100 MB after one soak round, flat here).
The worker calls `trim_heap()` once when it goes idle after work; RSS then tracks what the
process really holds. A no-op where libc has no `malloc_trim` (musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time

log = logging.getLogger("marche.memory")


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Return free heap pages of every malloc arena to the OS; True if the libc has it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    started = time.perf_counter()
    trim(0)
    log.debug("malloc_trim took %.1f ms", (time.perf_counter() - started) * 1000)
    return True
