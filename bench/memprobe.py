"""Peak extra memory of a measured region, from Linux's own counters (shared by the bench workers).

``reset_peak()`` returns the process's resident set after handing free heap back to the OS (``malloc_trim``) and
resetting the high-water mark (``/proc/self/clear_refs``); ``peak_gb_since(before)`` is the high-water mark above it.
"""

from __future__ import annotations

import ctypes

__all__ = ["status_kb", "reset_peak", "peak_gb_since"]


def status_kb(key: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> int:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return status_kb("VmRSS")


def peak_gb_since(before_kb: int) -> float:
    return (status_kb("VmHWM") - before_kb) / 2**20
