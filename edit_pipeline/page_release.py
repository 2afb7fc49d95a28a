"""Gives pages this process no longer needs back to the kernel: those of a mapped
weights file once what was read from them is kept elsewhere, and the heap's free ones.

OpenVINO maps an IR's weights file (model.bin) and reads it when the first call packs the
weights for the CPU, in the precision it computes in; the packed copy is what later
calls use. The mapped pages stay in the process (PSS) until the kernel is short of
memory. Advising them away (madvise MADV_DONTNEED on a read-only mapping of a file:
its pages leave this process, and are read from the file again if ever touched) hands
them back at once: about 1.7 GB per SD 1.5-size UNet (benchmarks/README.md, "Memory and start
at real size").

Working memory a compiled model releases goes back to the C heap, which keeps most of it
for later allocations; trimming the heap hands its free pages to the kernel: after an SD
1.5-size shallow UNet pass at 512x512 in bf16, 0.18 GB more than the release alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

MAPS = Path("/proc/self/maps")
# <sys/mman.h>: free the range's pages; a private file mapping reads them again on access.
MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name, use_errno=True)


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    libc = _libc()
    if libc is None:
        return None
    function = libc.madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    libc = _libc()
    function = getattr(libc, "malloc_trim", None) if libc is not None else None
    if function is not None:
        function.argtypes = [ctypes.c_size_t]
        function.restype = ctypes.c_int
    return function


def mapped_ranges(path: Path, maps: Path = MAPS) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path` read-only: (start, end) pairs. A
    writable mapping may hold pages of its own, which dropping would lose: left out."""
    # The kernel names a mapping by its file's path with every link resolved.
    target = os.path.realpath(path)
    try:
        lines = maps.read_text().splitlines()
    except OSError:  # no /proc: nothing is known to be mapped
        return []
    ranges = []
    for line in lines:
        if not line.endswith(target):
            continue
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target and "w" not in fields[1]:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_mapped_pages(path: Path) -> int:
    """Drops this process's pages of the file at `path` (mapped read-only); returns the
    bytes of address space advised (0 where it is not mapped or madvise is missing)."""
    madvise = _madvise()
    if madvise is None:
        return 0
    released = 0
    for start, end in mapped_ranges(path):
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
    return released


def release_free_heap() -> bool:
    """Hands the C heap's free pages back to the kernel (glibc's malloc_trim); returns
    whether any were (False where the C library has no malloc_trim, as musl's)."""
    trim = _malloc_trim()
    return trim is not None and trim(0) == 1
