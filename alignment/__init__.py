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
# Transparent huge pages for torch's CPU buffers of 2 MB and more (gradients, logits, the KV cache): a
# fresh buffer then faults in 2 MB pages rather than 4 KB ones. torch reads the variable at its first
# allocation, so only a process that imports this package before torch gets it (the `align` command);
# set THP_MEM_ALLOC_ENABLE=0 to opt out. Measured: a PMD step of `align bench pmd_phases` 5.60 -> 4.83 s
# in fp32 with AVX2 kernels (AMD EPYC, 2 cores); 3.81 -> 3.65 s in bf16 (benchmarks/RESULTS.md).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
