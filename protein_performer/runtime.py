"""Process-wide runtime settings for CPU work.

glibc's malloc hands every large block (tens of MB: a FAVOR+ feature tensor of L x m per head is
67 MB at L = 8192) to the OS on free and maps fresh, zero-filled pages on the next allocation.
PyTorch has no caching allocator on the CPU, so every forward/backward pays page faults
proportional to its memory: measured here, FAVOR+ fwd+bwd at L = 8192 ran 1.3-1.9x slower
and time(16384)/time(8192) grew to 2.4-2.9 instead of ~2 (benchmarks/RESULTS.md).
:func:`keep_freed_memory` tells malloc to keep freed memory for reuse instead. The resident set
then stays at its high-water mark, which is what a training or export process wants anyway.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_done = False


def keep_freed_memory(top_pad_mb: int = 1024) -> bool:
    """Keep freed heap memory for reuse (glibc only; a no-op elsewhere). Returns True if applied.

    Sets ``M_MMAP_MAX = 0`` (large blocks come from the heap, not fresh mmaps),
    ``M_TRIM_THRESHOLD`` to its maximum (never give the heap back) and ``M_TOP_PAD`` (grow the heap
    in ``top_pad_mb`` steps). Disabled by ``PROTEIN_PERFORMER_KEEP_MEMORY=0``. Idempotent.
    """
    global _done
    if _done:
        return True
    if os.environ.get("PROTEIN_PERFORMER_KEEP_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_MAX, 0) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
            and libc.mallopt(_M_TOP_PAD, int(top_pad_mb) << 20) == 1
        )
    except (OSError, AttributeError) as e:  # not glibc (musl, macOS): nothing to tune
        log.debug("malloc tuning unavailable: %s", e)
        return False
    _done = ok
    log.debug("malloc keeps freed memory: %s", ok)
    return ok


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` tuned malloc in this process (FAVOR+'s CPU path choice reads it)."""
    return _done


def set_threads(num_threads: int | None) -> None:
    """``torch.set_num_threads(num_threads)`` when given (the entry points' ``num_threads`` option)."""
    if num_threads:
        import torch

        torch.set_num_threads(int(num_threads))
