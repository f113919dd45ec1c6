"""PeakMemory: the peak of its own block, by the kernel's high-water mark or by sampling."""

from __future__ import annotations

import pytest

from lmtune.profiling import PeakMemory

MB = 1 << 20
SIZE = 200 * MB


def _in_fresh_process(body: str) -> dict:
    """Run ``body`` in a new interpreter and return the JSON it prints.

    Resident memory belongs to the whole process: in the long-lived test process, memory that earlier
    tests left to the allocator or to the page cache can come back into the resident set during a block
    and move its peak. A fresh process measures only the block.
    """
    import json
    import subprocess
    import sys
    import textwrap

    head = f"""
import json, time, numpy as np
from lmtune import profiling
from lmtune.profiling import PeakMemory, current_rss, release_free_memory
MB, SIZE = {MB}, {SIZE}
def alloc(n):
    a = np.ones(n // 8)  # ones, not empty: untouched pages are never resident
    assert a.sum() == n // 8
    time.sleep(0.05)  # long enough for the sampling fallback to see it
    del a
"""
    proc = subprocess.run([sys.executable, "-c", head + textwrap.dedent(body)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_peak_sees_a_freed_array():
    out = _in_fresh_process("""
        release_free_memory()
        with PeakMemory() as mem:
            alloc(SIZE)
        print(json.dumps({**mem.to_dict(), "end": current_rss()}))
    """)
    assert out["method"] in ("clear_refs", "sampling")
    assert out["delta_rss_bytes"] == out["peak_rss_bytes"] - out["start_rss_bytes"]
    # The array is freed inside the block, so only a peak measurement (not the end RSS) can see it.
    assert 0.9 * SIZE <= out["delta_rss_bytes"] < SIZE + 100 * MB
    assert out["end"] < out["start_rss_bytes"] + 0.5 * SIZE


def test_a_later_block_does_not_inherit_an_earlier_peak():
    out = _in_fresh_process("""
        release_free_memory()
        with PeakMemory():
            alloc(SIZE)
        release_free_memory()
        with PeakMemory() as small:
            alloc(10 * MB)
        print(json.dumps(small.to_dict()))
    """)
    if out["method"] != "clear_refs":
        pytest.skip("the kernel high-water mark cannot be reset here")
    assert out["delta_rss_bytes"] < 60 * MB


def test_sampling_fallback():
    out = _in_fresh_process("""
        profiling._CLEAR_REFS = profiling.Path("/nonexistent/clear_refs")
        release_free_memory()
        with PeakMemory(interval=0.001) as mem:
            alloc(SIZE)
        print(json.dumps(mem.to_dict()))
    """)
    assert out["method"] == "sampling"
    assert 0.9 * SIZE <= out["delta_rss_bytes"] < SIZE + 100 * MB


def test_nested_blocks_keep_the_outer_peak():
    out = _in_fresh_process("""
        release_free_memory()
        with PeakMemory() as outer:
            alloc(SIZE)
            release_free_memory()
            with PeakMemory() as inner:
                alloc(10 * MB)
        print(json.dumps({"outer": outer.to_dict(), "inner": inner.to_dict()}))
    """)
    if out["outer"]["method"] != "clear_refs":
        pytest.skip("the kernel high-water mark cannot be reset here")
    assert out["outer"]["delta_rss_bytes"] >= 0.9 * SIZE  # the inner reset did not erase it
    assert out["inner"]["delta_rss_bytes"] < 60 * MB


def test_cuda_peak():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    torch.zeros(1, device="cuda")  # initialise the context outside the block
    held = torch.cuda.memory_allocated()  # tensors other tests left on the GPU count in the peak too
    with PeakMemory() as mem:
        x = torch.ones(SIZE // 4, device="cuda")  # float32
        del x
    assert held + SIZE <= mem.cuda_peak_bytes < held + SIZE + 50 * MB
    with PeakMemory() as small:
        y = torch.ones(MB // 4, device="cuda")
        del y
    assert small.cuda_peak_bytes < held + 10 * MB  # the earlier peak was reset
