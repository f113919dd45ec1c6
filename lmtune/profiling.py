"""Peak memory of a block of code: how much a fit needed at its worst moment, not how much it kept.

``getrusage``'s ``ru_maxrss`` is the peak of the whole process so far, so once one method has used 3 GB
every later method also reports 3 GB. :class:`PeakMemory` measures the peak of *its block*:

* **Linux, ``clear_refs``.** Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water
  mark of the resident set (``VmHWM``) to the current resident size; after the block, ``VmHWM`` in
  ``/proc/self/status`` is exactly the block's peak. No thread, no sampling error, no cost. The reset is
  process-wide, so an outer :class:`PeakMemory` would lose its own peak to an inner one: each block
  therefore hands the high-water mark it is about to erase to the blocks that enclose it.
* **Sampling fallback.** Where that file cannot be written (a hardened kernel, another OS), a background
  thread samples the resident size every ``interval`` seconds (10 ms) and keeps the largest value. A peak
  shorter than the interval can be missed, so this is a lower bound; ``method`` says which was used.
* **CUDA.** When torch is already imported and a GPU is present, the allocator's peak is reset and read as
  well (``torch.cuda.max_memory_allocated``): tensors on the GPU do not show in the resident set.

Resident memory is what the operating system charges; freed memory that the allocator keeps for reuse
still counts, which is why :func:`release_free_memory` exists: call it before a measurement so that
garbage from earlier work is returned first and every block starts from the same footing.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_CPUINFO = Path("/proc/cpuinfo")


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, or None off Linux."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def current_rss() -> int:
    """The resident set size of this process now, in bytes."""
    rss = _status_kib("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # no /proc and no psutil: the process peak is the best available figure
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)


def release_free_memory() -> None:
    """Collect garbage and ask glibc to return freed heap pages to the system (``malloc_trim``)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _cuda():
    """The ``torch.cuda`` module when torch is loaded and a GPU is usable, else None (never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() else None
    except Exception:  # a broken driver must not break a measurement of CPU memory
        return None


class PeakMemory:
    """Context manager: the peak resident memory (and CUDA allocation) while its block ran.

    Parameters
    ----------
    interval : float
        Seconds between samples when the sampling fallback is used.

    Attributes
    ----------
    start_rss_bytes : int
        Resident set size when the block started.
    peak_rss_bytes : int
        Largest resident set size during the block (at least ``start_rss_bytes``).
    cuda_peak_bytes : int or None
        Largest CUDA memory allocated by torch during the block; None without a GPU.
    method : str
        ``"clear_refs"`` (exact kernel high-water mark) or ``"sampling"`` (a lower bound).

    Examples
    --------
    >>> with PeakMemory() as mem:
    ...     x = bytearray(50 << 20)
    >>> mem.peak_rss_bytes - mem.start_rss_bytes >= 40 << 20
    True
    """

    _active: list["PeakMemory"] = []  # enclosing blocks, outermost first (clear_refs is process-wide)

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start_rss_bytes = 0
        self.peak_rss_bytes = 0
        self.cuda_peak_bytes: int | None = None
        self.method = ""
        self._seen = 0
        self._cuda_seen = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def delta_bytes(self) -> int:
        """Peak above the starting resident size: what the block itself needed."""
        return self.peak_rss_bytes - self.start_rss_bytes

    def __enter__(self) -> "PeakMemory":
        cuda = _cuda()
        if cuda is not None:
            cuda.synchronize()
            for outer in PeakMemory._active:  # the reset is device-wide: hand enclosing blocks their peak
                outer._cuda_seen = max(outer._cuda_seen, int(cuda.max_memory_allocated()))
            cuda.reset_peak_memory_stats()
        self.start_rss_bytes = current_rss()
        self._seen = self.start_rss_bytes
        if self._reset_hwm():
            self.method = "clear_refs"
        else:
            self.method = "sampling"
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="lmtune-peak-memory", daemon=True)
            self._thread.start()
        PeakMemory._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        PeakMemory._active.remove(self)
        if self.method == "clear_refs":
            hwm = _status_kib("VmHWM") or 0
            self._seen = max(self._seen, hwm)
            for outer in PeakMemory._active:  # they were reset by us too; pass our peak on
                outer._seen = max(outer._seen, hwm)
        else:
            self._stop.set()
            self._thread.join()
        self.peak_rss_bytes = max(self._seen, current_rss())
        cuda = _cuda()
        if cuda is not None:
            cuda.synchronize()
            peak = int(cuda.max_memory_allocated())
            self.cuda_peak_bytes = max(self._cuda_seen, peak)
            for outer in PeakMemory._active:
                outer._cuda_seen = max(outer._cuda_seen, peak)

    def _reset_hwm(self) -> bool:
        """Reset the kernel's high-water mark, first handing the current one to enclosing blocks."""
        hwm = _status_kib("VmHWM")
        if hwm is None:
            return False
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError:
            return False
        for outer in PeakMemory._active:
            outer._seen = max(outer._seen, hwm)
        return True

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._seen = max(self._seen, current_rss())
            time.sleep(self.interval)

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {"start_rss_bytes": self.start_rss_bytes, "peak_rss_bytes": self.peak_rss_bytes,
                "delta_rss_bytes": self.delta_bytes, "cuda_peak_bytes": self.cuda_peak_bytes, "method": self.method}


def cpu_name() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux), for benchmark and report records."""
    import platform

    try:
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
