"""alignment: the shared core every trainer uses."""

import ctypes
import os
import sys


def _keep_freed_memory() -> None:
    """Let glibc keep large freed blocks instead of unmapping them.

    Training allocates and frees the same 100+ MB tensors every step (embedding gradients, optimizer
    temporaries, logits). By default glibc serves each from a fresh mmap and returns it on free, so
    every step pays page faults to touch them again: measured 0.46 -> 0.29 s for one AdamW step on
    SmolLM2's embedding. Set ALIGNMENT_MALLOC_TUNING=0 to keep glibc's defaults.
    """
    if not sys.platform.startswith("linux") or os.environ.get("ALIGNMENT_MALLOC_TUNING", "1") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


_keep_freed_memory()
