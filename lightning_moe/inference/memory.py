"""Memory for EdgeMoE: reused byte buffers, what a model holds, the process's resident set, the page cache.

- `BufferPool`: the byte buffers expert loads read into and dequantise into, handed out again
  after use instead of allocated anew (the `ExpertOffloader` owns one).
- `resident_bytes` / `tensor_bytes`: bytes of a model's parameters and buffers, of one tensor.
- `memory_status`: a process's resident set and its peak (Linux `/proc`; this one by default), what
  the benchmark and the loading test measure.
- `drop_from_page_cache` / `evict_from_page_cache`: advise the kernel to drop files from the OS
  page cache, so the next read of an expert comes from storage (what a device whose memory cannot
  hold the store sees); the `ExpertStore` uses them for `drop_page_cache` and `evict_page_cache`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from .quantize import QuantizedTensor

__all__ = ["BufferPool", "resident_bytes", "tensor_bytes", "memory_status", "drop_from_page_cache",
           "evict_from_page_cache", "require_page_cache_advice"]


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def tensor_bytes(t: Tensor | QuantizedTensor | None) -> int:
    """Bytes one tensor occupies (a QuantizedTensor: its codes, scales and offsets; None: 0)."""
    if t is None:
        return 0
    return t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()


def memory_status(pid: int | None = None) -> dict[str, int]:
    """This process's (or process `pid`'s) resident set now and its peak (bytes), from /proc/PID/status (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024  # reported in kB
    return {"rss": fields["VmRSS"], "peak_rss": fields["VmHWM"]}


def require_page_cache_advice(what: str) -> None:
    """Raise ValueError naming `what` unless this system can advise the kernel about its page cache."""
    if not hasattr(os, "posix_fadvise"):
        raise ValueError(f"{what} needs os.posix_fadvise (Linux and other POSIX systems), not available here")


def drop_from_page_cache(fd: int) -> None:
    """Advise the kernel to drop the open file's pages from the OS page cache (POSIX_FADV_DONTNEED)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def evict_from_page_cache(paths: Iterable[Path]) -> None:
    """Advise the kernel to drop every existing file of `paths` from the OS page cache."""
    require_page_cache_advice("evicting files from the page cache")
    for path in paths:
        if path.is_file():
            with open(path, "rb") as f:
                drop_from_page_cache(f.fileno())


class BufferPool:
    """Byte buffers handed out again after use, so expert loads reuse memory instead of allocating it.

    Without it every load allocates expert-sized tensors: fresh pages are faulted in (about the
    cost of a copy), and memory freed from the prefetch thread's malloc arena mostly stays with
    the process (measured on the benchmark's EdgeMoE configuration: about 450 MiB of resident set
    beyond the expert bytes held). Buffers are keyed by size (a store has a few). A buffer given
    back with `retire` may still be read by the layer computing now, so it becomes free only at
    the next `advance` (the offloader calls it when the next MoE layer call starts, after the
    previous layer's compute), and only once every background job that started before it was
    retired has ended (`begin_job` / `end_job`: the prefetch thread may still be reading a cached
    expert that the decoding thread evicts). `release` frees at once. Free buffers beyond
    `max_free_bytes` are dropped to the allocator.
    """

    def __init__(self, max_free_bytes: int) -> None:
        self.max_free_bytes = max_free_bytes
        self._free: dict[int, list[Tensor]] = {}
        self._retired: list[tuple[int, Tensor]] = []  # (epoch retired, buffer)
        self._epoch = 0
        self._jobs: dict[int, int] = {}  # running background job -> epoch it started in
        self._next_job = 0
        self.free_bytes = 0
        self.retired_bytes = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self.free_bytes + self.retired_bytes

    GRANULE = 1 << 16  # sizes above 1 MiB round up to this: expert files differ by a few header bytes
    SMALL_GRANULE = 1 << 12  # smaller ones to a page, so tiny experts are not inflated

    def take(self, nbytes: int) -> Tensor:
        """A uint8 buffer of at least `nbytes` (reused if one of its size class is free, else new)."""
        granule = self.GRANULE if nbytes > 1 << 20 else self.SMALL_GRANULE
        size = -(-nbytes // granule) * granule
        with self._lock:
            free = self._free.get(size)
            if free:
                self.free_bytes -= size
                return free.pop()
        return torch.empty(size, dtype=torch.uint8)

    def _add_free(self, buffer: Tensor) -> None:
        if self.free_bytes + buffer.numel() <= self.max_free_bytes:
            self._free.setdefault(buffer.numel(), []).append(buffer)
            self.free_bytes += buffer.numel()

    def release(self, buffers: tuple[Tensor, ...]) -> None:
        """Buffers nothing reads any more: free now."""
        with self._lock:
            for buffer in buffers:
                self._add_free(buffer)

    def retire(self, buffers: tuple[Tensor, ...]) -> None:
        """Buffers the layer computing now may still read: free from the next `advance` on."""
        with self._lock:
            for buffer in buffers:
                self._retired.append((self._epoch, buffer))
                self.retired_bytes += buffer.numel()

    def begin_job(self) -> int:
        """A background job starts (it may read buffers that get retired while it runs); returns its token."""
        with self._lock:
            token, self._next_job = self._next_job, self._next_job + 1
            self._jobs[token] = self._epoch
            return token

    def end_job(self, token: int) -> None:
        with self._lock:
            del self._jobs[token]

    def advance(self) -> None:
        """A new MoE layer call starts: what was retired before it is no longer read by the layers;
        it is free unless a background job that started no later than its retirement still runs."""
        with self._lock:
            self._epoch += 1
            oldest_job = min(self._jobs.values(), default=self._epoch)
            still_read = []
            for retired_at, buffer in self._retired:
                if retired_at < oldest_job:
                    self.retired_bytes -= buffer.numel()
                    self._add_free(buffer)
                else:
                    still_read.append((retired_at, buffer))
            self._retired = still_read
