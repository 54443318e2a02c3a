"""glibc malloc settings that keep freed memory in the process instead of handing it back to the kernel.

PyTorch on CPU allocates and frees large activation and gradient buffers every training step. With glibc's
defaults, blocks above the (dynamic) mmap threshold are mapped and unmapped each time and freed heap tops are
trimmed, so every step page-faults its buffers in again. On the 2-core VM raymia is developed on (a Firecracker
guest, where a page fault is expensive) that made the NN attack's first training run 58-70 s instead of 4-17 s
(``benchmarks/allocator.py``). glibc reads these settings from the environment when a process starts, so they
are set for: the ``raymia`` command (it re-executes itself once with them), ``make`` targets (exported), and Ray
workers (``runtime_env.env_vars`` of the Ray instance raymia starts or joins). Opt out with
``RAYMIA_MALLOC_TUNING=0``. The cost: a process keeps its peak heap until it exits.
"""

from __future__ import annotations

import os
import platform
import sys

#: The settings (bytes): no mmap below 1 GiB, no trim below 4 GiB, grow the heap by 256 MiB at a time.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
                 "MALLOC_TOP_PAD_": str(256 << 20)}


def wanted() -> bool:
    """Whether this process should use :data:`ALLOCATOR_ENV` (Linux with glibc, not opted out)."""
    return (os.environ.get("RAYMIA_MALLOC_TUNING", "1") != "0" and sys.platform.startswith("linux")
            and platform.libc_ver()[0] == "glibc")


def allocator_env() -> dict[str, str]:
    """The variables to give a child process or Ray worker (empty where not :func:`wanted`)."""
    return dict(ALLOCATOR_ENV) if wanted() else {}


def reexec_with_allocator_env() -> None:
    """Re-execute this Python command with :data:`ALLOCATOR_ENV` set, once, if it is not set already."""
    if not wanted() or all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
        return
    os.environ.update(ALLOCATOR_ENV)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
