"""A model of PyTorch's CUDA caching allocator: reserved bytes from a sequence of allocations.

`torch.cuda.max_memory_allocated` counts blocks, not tensors, and NVML sees the segments the
allocator reserved with cudaMalloc, which it keeps cached after the tensors die. The tracer
knows only the order in which storages are born and die; replaying that order through this
model estimates both. The constants and rules are those of
c10/cuda/CUDACachingAllocator.cpp (PyTorch 2.x, default settings):

- every request is rounded up to a multiple of kMinBlockSize (512 B) — `round_size`;
- requests ≤ kSmallSize (1 MiB) come from the small pool, whose segments are kSmallBuffer
  (2 MiB); larger requests from the large pool, whose segments are kLargeBuffer (20 MiB)
  for requests under kMinLargeAlloc (10 MiB), else the request rounded up to kRoundLarge
  (2 MiB) — `get_allocation_size`;
- a request takes the smallest cached free block of its pool that fits (best fit,
  `get_free_block`); the block is split when the remainder is ≥ kMinBlockSize (small pool)
  or > kSmallSize (large pool) — `should_split`; a freed block merges with free neighbours
  of its segment — `free_block` / `try_merge_blocks`;
- segments are never returned to the driver (no `empty_cache`, no OOM-triggered release),
  so reserved memory only grows.

Simplified: one stream (no cross-stream event waits), no expandable segments, no
`max_split_size_mb` / garbage-collection threshold / `roundup_power2_divisions` settings,
and no workspaces allocated inside kernels (cuBLAS, flash-attention split-KV), which the
tracer cannot see.
"""

import bisect
from dataclasses import dataclass

# c10/cuda/CUDACachingAllocator.cpp (constants in namespace c10::CachingDeviceAllocator / CUDACachingAllocator):
# https://github.com/pytorch/pytorch/blob/main/c10/cuda/CUDACachingAllocator.cpp
K_MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1 << 20  # kSmallSize: largest "small" allocation is 1 MiB
K_SMALL_BUFFER = 2 << 20  # kSmallBuffer: "small" allocations are packed in 2 MiB blocks
K_LARGE_BUFFER = 20 << 20  # kLargeBuffer: "large" allocations may be packed in 20 MiB blocks
K_MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc: allocations between 1 and 10 MiB may use kLargeBuffer
K_ROUND_LARGE = 2 << 20  # kRoundLarge: round up large allocations to 2 MiB


def round_size(nbytes):
    """Bytes a request occupies in a block (`round_size`)."""
    if nbytes < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    return K_MIN_BLOCK_SIZE * -(-nbytes // K_MIN_BLOCK_SIZE)


def allocation_size(rounded):
    """Bytes of the segment cudaMalloc'ed when no cached block fits (`get_allocation_size`)."""
    if rounded <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if rounded < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * -(-rounded // K_ROUND_LARGE)


@dataclass
class _Block:
    segment: int
    offset: int
    size: int
    small: bool
    free: bool = True
    prev: "_Block" = None
    next: "_Block" = None

    def key(self):
        return (self.size, self.segment, self.offset)


class CachingAllocatorModel:
    """Replays malloc/free events; tracks allocated (block) bytes and reserved (segment) bytes."""

    def __init__(self):
        self._free = {True: [], False: []}  # pool (small?) → sorted [(size, segment, offset)]
        self._by_key = {}  # (size, segment, offset) → free _Block
        self._live = {}  # caller's key → allocated _Block
        self._segments = 0
        self.reserved_bytes = 0
        self.allocated_bytes = 0  # sum of block sizes, what torch.cuda.memory_allocated reports
        self.peak_allocated_bytes = 0
        self.peak_reserved_bytes = 0

    def _insert_free(self, b):
        k = b.key()
        bisect.insort(self._free[b.small], k)
        self._by_key[k] = b

    def _remove_free(self, b):
        k = b.key()
        lst = self._free[b.small]
        i = bisect.bisect_left(lst, k)
        del lst[i]
        del self._by_key[k]

    def malloc(self, key, nbytes):
        """Allocate `nbytes` for `key` (a storage id). Zero-byte requests take no block."""
        if nbytes <= 0:
            return
        size = round_size(nbytes)
        small = size <= K_SMALL_SIZE
        lst = self._free[small]
        i = bisect.bisect_left(lst, (size, -1, -1))
        if i < len(lst):
            block = self._by_key[lst[i]]
            self._remove_free(block)
        else:
            seg_size = allocation_size(size)
            self._segments += 1
            block = _Block(self._segments, 0, seg_size, small)
            self.reserved_bytes += seg_size
            self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        remaining = block.size - size
        if (remaining >= K_MIN_BLOCK_SIZE) if small else (remaining > K_SMALL_SIZE):
            rest = _Block(block.segment, block.offset + size, remaining, small, True, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert_free(rest)
        block.free = False
        self._live[key] = block
        self.allocated_bytes += block.size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)

    def free(self, key):
        """Return `key`'s block to its pool, merging with free neighbours."""
        block = self._live.pop(key, None)
        if block is None:
            return
        self.allocated_bytes -= block.size
        block.free = True
        for nb in (block.prev, block.next):
            if nb is not None and nb.free:
                self._remove_free(nb)
                if nb is block.prev:
                    nb.size += block.size
                    nb.next = block.next
                    if block.next is not None:
                        block.next.prev = nb
                    block = nb
                else:
                    block.size += nb.size
                    block.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = block
        self._insert_free(block)
