"""Peak resident memory of the calling process, read where it is not polluted by its parent.

``getrusage`` reports the larger of the process's own peak and the peak of the memory it was
spawned from (Linux records the parent's high-water mark at ``exec`` after ``vfork``), so a child
of a big parent appears big. ``VmHWM`` in ``/proc/self/status`` belongs to the process's own
address space only. Linux-only, like the benchmarks' figures.
"""

from __future__ import annotations

from pathlib import Path


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2  # kB -> GB
    raise RuntimeError("no VmHWM in /proc/self/status (the benchmarks need Linux)")
