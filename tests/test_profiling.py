"""PeakMemory: the peak of its own block, by the kernel's high-water mark or by sampling."""

from __future__ import annotations

import numpy as np
import pytest

from lmtune import profiling
from lmtune.profiling import PeakMemory, current_rss, release_free_memory

MB = 1 << 20
SIZE = 200 * MB


def _allocate_and_free(nbytes: int) -> None:
    a = np.ones(nbytes // 8)  # ones, not empty: untouched pages are never resident
    assert a.sum() == nbytes // 8
    del a


def _check_block_peak(mem: PeakMemory) -> None:
    # The array is freed inside the block, so only a peak measurement (not the end RSS) can see it.
    assert mem.peak_rss_bytes - mem.start_rss_bytes >= 0.9 * SIZE
    assert mem.peak_rss_bytes - mem.start_rss_bytes < SIZE + 100 * MB
    assert current_rss() < mem.start_rss_bytes + 0.5 * SIZE


def test_peak_sees_a_freed_array():
    release_free_memory()
    with PeakMemory() as mem:
        _allocate_and_free(SIZE)
    assert mem.method in ("clear_refs", "sampling")
    _check_block_peak(mem)
    assert mem.to_dict()["delta_rss_bytes"] == mem.delta_bytes


def test_a_later_block_does_not_inherit_an_earlier_peak():
    release_free_memory()
    with PeakMemory():
        _allocate_and_free(SIZE)
    release_free_memory()
    with PeakMemory() as small:
        _allocate_and_free(10 * MB)
    if small.method != "clear_refs":
        pytest.skip("the kernel high-water mark cannot be reset here")
    assert small.delta_bytes < 60 * MB


def test_sampling_fallback(monkeypatch):
    monkeypatch.setattr(profiling, "_CLEAR_REFS", profiling.Path("/nonexistent/clear_refs"))
    release_free_memory()
    with PeakMemory(interval=0.001) as mem:
        a = np.ones(SIZE // 8)
        import time
        time.sleep(0.05)  # let the sampler see it
        del a
    assert mem.method == "sampling"
    _check_block_peak(mem)


def test_nested_blocks_keep_the_outer_peak():
    release_free_memory()
    with PeakMemory() as outer:
        _allocate_and_free(SIZE)
        release_free_memory()
        with PeakMemory() as inner:
            _allocate_and_free(10 * MB)
    if outer.method != "clear_refs":
        pytest.skip("the kernel high-water mark cannot be reset here")
    assert outer.delta_bytes >= 0.9 * SIZE  # the inner reset did not erase it
    assert inner.delta_bytes < 60 * MB


def test_cuda_peak():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    torch.zeros(1, device="cuda")  # initialise the context outside the block
    with PeakMemory() as mem:
        x = torch.ones(SIZE // 4, device="cuda")  # float32
        del x
    assert SIZE <= mem.cuda_peak_bytes < SIZE + 50 * MB
    with PeakMemory() as small:
        y = torch.ones(MB // 4, device="cuda")
        del y
    assert small.cuda_peak_bytes < 10 * MB  # the earlier peak was reset
