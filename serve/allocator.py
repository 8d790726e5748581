"""Memory given back to the operating system after large requests (glibc's malloc).

glibc's malloc serves a request of 128 KiB or more with its own mmap, returned to the system on
free, but raises that threshold to the size of every such block freed, up to 32 MiB. After the
first 16 MiB request body is freed, later bodies, decoded tensors and answers come from the heap,
whose freed blocks mostly stay with the process: under 16 concurrent 2048 x 2048 requests the
server's heap held 2.8 GiB (measured, docs/benchmarks.md). A fixed threshold (which also turns
the adjustment off) keeps every allocation of 4 MiB or more on its own mapping. Smaller ones
(such as the 1 MiB slices an HTTP answer is sent in) stay on the heap, where they are reused:
with a 1 MiB threshold each slice faulted in fresh pages while holding the GIL, and health checks
during a 2048 x 2048 answer took twice as long.

Freed blocks under the threshold stay in malloc's per-thread arenas: `release_free_memory`
(`malloc_trim`) hands their free pages back, which the server does whenever its last request
holding a large share of memory ends (`core.ModelTable`): after 16 requests at once on the
conv model, 164 MiB stayed resident instead of 304 (111 at rest).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

logger = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
LARGE_ALLOCATION_BYTES = 4 << 20


def _glibc_function(name: str) -> Any:
    """A function of glibc, or None where the C library is another."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def map_large_allocations(threshold: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Have glibc mmap every allocation of `threshold` bytes or more; False where the C library
    is not glibc (nothing changes there)."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        logger.info("not glibc: large allocations stay with the C library's own policy")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def release_free_memory() -> None:
    """Give the free pages of every malloc arena back to the system (glibc; elsewhere nothing).
    ctypes releases the GIL for the call, so it may run in a worker thread beside the server."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = _glibc_function("malloc_trim")
