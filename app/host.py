"""What machine this runs on, for reports (replay, bench, training)."""
from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's name for it elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MMAP_THRESHOLD = 256 * 1024   # bytes: larger blocks get their own mapping, unmapped on free


def return_freed_memory() -> bool:
    """Make large freed blocks go back to the system (glibc only; False elsewhere).

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB), after
    which a session's buffers (generation caches, frames) come from the heap and stay
    there when it ends: a server's memory grew about 1.7 MB per session opened, for good.
    A fixed threshold keeps them mapped; measured over 250 engine open/close cycles, the
    growth levels off at about 85 MB."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))       # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def trim_memory() -> None:
    """Hand the free memory at the top of glibc's heaps back to the system (no-op elsewhere):
    after a session ends, what it freed leaves the process instead of waiting for reuse."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
