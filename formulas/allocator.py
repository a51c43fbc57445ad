"""A simulation of PyTorch's CUDA caching allocator: reserved bytes from a stream of mallocs and frees.

`torch.cuda.max_memory_allocated` counts blocks, not tensors, and NVML sees the segments the
allocator reserved from the driver, which it keeps cached after the tensors die. Replaying a
workload's allocation stream (the tracer's log: every storage's birth and death, in order) through
this port of the allocator gives both, phase by phase, without a GPU. It is pure Python (no torch),
so the formulas' slack rules can be derived from it and `vramlab trace --alloc-conf` can ask "what
if expandable_segments were on".

Pure Python, no torch, no I/O: it lives in formulas/ so that `vramlab predict` can simulate the load of a
model's weights, and harness/tracing/allocator.py re-exports it for the tracer.

Ported from c10/cuda/CUDACachingAllocator.cpp (pytorch/pytorch@001074d, the native backend as in
torch 2.4–2.11; the logic below has not changed over those releases apart from what is noted) and
the option parser c10/core/AllocatorConfig.cpp (@065861f; c10/cuda/CUDAAllocatorConfig.cpp before
torch 2.9). Line references are to those files:

- `round_size`: requests are rounded to kMinBlockSize (512 B), or up to the next power-of-2
  division when `roundup_power2_divisions` asks for it (`roundup_power2_next_division`);
- pools: requests ≤ kSmallSize (1 MiB) come from the small pool, the rest from the large pool, one
  pair of pools per stream (`get_pool`, `BlockComparatorSize` orders by stream first);
- `get_allocation_size`: a new small segment is kSmallBuffer (2 MiB); a large one kLargeBuffer
  (20 MiB) for requests under kMinLargeAlloc (10 MiB), else the request rounded up to kRoundLarge
  (2 MiB);
- `get_free_block`: best fit — the smallest cached free block of the pool and stream that is large
  enough (ties by address); a request under `max_split_size` never takes a block at or above it, and
  a request at or above it only takes a block less than `max_non_split_rounding_size` (kLargeBuffer by
  default) larger;
- `should_split`: the remainder of a small block is split off when ≥ kMinBlockSize; of a large block
  when > kSmallSize and the request is under `max_split_size` (with expandable segments, when ≥
  kMinBlockSize);
- `free_block` / `try_merge_blocks`: a freed block merges with free neighbours of its segment;
- `malloc`: search the pool; else garbage-collect (only under a memory fraction with
  `garbage_collection_threshold`), then allocate a segment; if that fails, release cached
  oversize blocks (`release_available_cached_blocks`, only with `max_split_size`), retry; then
  release every unsplit cached block (`release_cached_blocks`, what `torch.cuda.empty_cache` does),
  retry once more; then it is an out-of-memory error;
- `alloc_block` under a memory fraction fails when reserved + the new segment would pass the limit;
- expandable segments (`expandable_segments:True`): one segment per stream and pool that grows by
  pages (2 MiB small, 20 MiB large: `find_expandable_block`, `map_block`, `try_allocate_expandable_block`)
  at the lowest address that has room, and whose wholly free pages `release_cached_blocks` unmaps
  (`unmap_block`, `release_blocks`).

Not modelled: cudaMallocAsync (`backend:cudaMallocAsync`, refused), CUDA graph private pools,
cross-stream `record_stream` events (a block is reused on its own stream as soon as it is freed),
and what other processes hold.
"""

import bisect
from dataclasses import dataclass, field

# c10/cuda/CUDACachingAllocator.cpp, constants in the Native namespace
K_MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1 << 20  # kSmallSize: largest "small" allocation is 1 MiB
K_SMALL_BUFFER = 2 << 20  # kSmallBuffer: "small" allocations are packed in 2 MiB blocks
K_LARGE_BUFFER = 20 << 20  # kLargeBuffer: "large" allocations may be packed in 20 MiB blocks
K_MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc: allocations between 1 and 10 MiB may use kLargeBuffer
K_ROUND_LARGE = 2 << 20  # kRoundLarge: round up large allocations to 2 MiB
# c10/core/AllocatorConfig.cpp: roundup_power2_divisions has one entry per power of two from 1 MiB to 64 GiB
K_ROUNDUP_POWER2_INTERVALS = 16
K_ROUNDUP_POWER2_START_LOG2 = 20
NO_SPLIT_LIMIT = (1 << 64) - 1  # std::numeric_limits<size_t>::max(): max_split_size when not set

# The environment variables torch reads the settings from: PYTORCH_ALLOC_CONF since torch 2.9
# (c10/core/AllocatorConfig.h), PYTORCH_CUDA_ALLOC_CONF before and still accepted.
ENV_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


class AllocConfError(ValueError):
    """A PYTORCH_CUDA_ALLOC_CONF string torch would refuse (its own message, in one line)."""


class AllocatorOOM(MemoryError):
    """The simulated allocator could not find memory for a request, after releasing its cache."""

    def __init__(self, requested, allocated, reserved, limit):
        self.requested, self.allocated, self.reserved, self.limit = requested, allocated, reserved, limit
        super().__init__(f"out of memory: tried to allocate {requested:,} bytes with {allocated:,} allocated and "
                         f"{reserved:,} reserved of a {limit:,}-byte limit")


@dataclass(frozen=True)
class AllocatorConfig:
    """The caching allocator's settings, as PYTORCH_CUDA_ALLOC_CONF sets them (defaults: AllocatorConfig())."""

    max_split_size: int = NO_SPLIT_LIMIT  # blocks this large are never split (max_split_size_mb)
    max_non_split_rounding_size: int = K_LARGE_BUFFER  # how much larger an unsplittable block may be (max_non_split_rounding_mb)
    garbage_collection_threshold: float = 0.0  # fraction of the memory limit past which cached blocks are freed
    roundup_power2_divisions: tuple = (0,) * K_ROUNDUP_POWER2_INTERVALS  # per power of two from 1 MiB
    expandable_segments: bool = False  # segments that grow by pages instead of one cudaMalloc per segment
    text: str = ""  # the string it was parsed from

    def divisions(self, size):
        """`AllocatorConfig::roundup_power2_divisions(size)`: the divisions of the power-of-2 interval of `size`."""
        index = (size.bit_length() - 1) - K_ROUNDUP_POWER2_START_LOG2
        index = min(max(index, 0), K_ROUNDUP_POWER2_INTERVALS - 1)
        return self.roundup_power2_divisions[index]


DEFAULT_CONFIG = AllocatorConfig()


def _lex(text):
    """`AllocatorConfig::lexArgs`: tokens split at , : [ ], spaces dropped."""
    out, buf = [], []
    for ch in text:
        if ch in ",:[]":
            if buf:
                out.append("".join(buf))
                buf = []
            out.append(ch)
        elif ch != " ":
            buf.append(ch)
    if buf:
        out.append("".join(buf))
    return out


def _is_pow2(n):
    return n > 0 and n & (n - 1) == 0


def parse_alloc_conf(text):
    """An AllocatorConfig from a PYTORCH_CUDA_ALLOC_CONF string, as `AllocatorConfig::parseArgs` reads it.

    Options of the host (pinned-memory) allocator and `release_lock_on_cudamalloc` are accepted and do not
    change device memory. AllocConfError where torch raises, and for `backend:cudaMallocAsync` (the driver's
    own pool, not simulated)."""
    text = text or ""
    tokens = _lex(text)
    cfg = {}
    divisions = [0] * K_ROUNDUP_POWER2_INTERVALS
    i = 0

    def expect(j, ch):
        if j >= len(tokens) or tokens[j] != ch:
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: expected {ch!r} "
                                 f"after {tokens[j - 1] if j - 1 < len(tokens) else 'the end'!r}")

    def value(j, name):
        if j >= len(tokens):
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: expecting a value for {name}")
        return tokens[j]

    def integer(s, name):
        try:
            return int(s)
        except ValueError:
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {name} {s!r} is not an integer") from None

    def boolean(j, name):
        v = value(j, name)
        if v not in ("True", "False"):
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: expected a single True/False argument for {name}")
        return v == "True"

    while i < len(tokens):
        key = tokens[i]
        if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            expect(i + 1, ":")
            i += 2
            mb = integer(value(i, key), key)
            if mb < K_LARGE_BUFFER >> 20:
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: CachingAllocator option {key} too small, "
                                     f"must be >= {K_LARGE_BUFFER >> 20}")
            cfg["max_split_size" if key == "max_split_size_mb" else "max_non_split_rounding_size"] = mb << 20
        elif key == "garbage_collection_threshold":
            expect(i + 1, ":")
            i += 2
            try:
                v = float(value(i, key))
            except ValueError:
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {key} is not a number") from None
            if not 0.0 < v < 1.0:
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: garbage_collect_threshold is invalid, "
                                     "set it in (0.0, 1.0)")
            cfg["garbage_collection_threshold"] = v
        elif key == "roundup_power2_divisions":
            expect(i + 1, ":")
            i += 2
            if value(i, key) == "[":
                first, last = True, 0
                i += 1
                while i < len(tokens) and tokens[i] != "]":
                    interval = tokens[i]
                    expect(i + 1, ":")
                    i += 2
                    d = integer(value(i, key), key)
                    if d and not _is_pow2(d):
                        raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: for roundups, the divisions have to "
                                             "be a power of 2 or 0 to disable roundup")
                    if interval == ">":
                        for k in range(last, K_ROUNDUP_POWER2_INTERVALS):
                            divisions[k] = d
                    else:
                        mb = integer(interval, key)
                        if not _is_pow2(mb):
                            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: for roundups, the intervals have "
                                                 "to be a power of 2")
                        k = min(max(mb.bit_length() - 1, 0), K_ROUNDUP_POWER2_INTERVALS - 1)
                        if first:
                            for kk in range(k):
                                divisions[kk] = d
                            first = False
                        divisions[k] = d
                        last = k
                    if i + 1 < len(tokens) and tokens[i + 1] != "]":
                        expect(i + 1, ",")
                        i += 1
                    i += 1
                if i >= len(tokens):
                    raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: roundup_power2_divisions list not closed")
            else:
                d = integer(value(i, key), key)
                if not _is_pow2(d):
                    raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: for roundups, the divisions have to be a "
                                         "power of 2")
                divisions = [d] * K_ROUNDUP_POWER2_INTERVALS
            cfg["roundup_power2_divisions"] = tuple(divisions)
        elif key == "expandable_segments":
            expect(i + 1, ":")
            i += 2
            cfg["expandable_segments"] = boolean(i, key)
        elif key == "backend":
            expect(i + 1, ":")
            i += 2
            v = value(i, key)
            if v == "cudaMallocAsync":
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: backend:cudaMallocAsync hands memory to the "
                                     "driver's own pool, which this simulation does not model (backend:native is)")
            if v != "native":
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: unknown allocator backend {v!r}, options "
                                     "are native and cudaMallocAsync")
        elif key in ("release_lock_on_cudamalloc", "pinned_use_cuda_host_register", "pinned_use_background_threads"):
            expect(i + 1, ":")
            i += 2
            boolean(i, key)  # thread and host-memory settings: no device bytes change
        elif key == "pinned_num_register_threads":
            expect(i + 1, ":")
            i += 2
            if not _is_pow2(integer(value(i, key), key)):
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: number of register threads has to be a "
                                     "power of 2")
        else:
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: unrecognized CachingAllocator option: {key}")
        if i + 1 < len(tokens):
            expect(i + 1, ",")
            i += 1
        i += 1
    return AllocatorConfig(text=text, **cfg)


def config_from_env(environ):
    """(AllocatorConfig, the variable it came from or '') as torch would read an environment (a mapping; the CLI
    passes os.environ)."""
    for var in ENV_VARS:
        if environ.get(var):
            return parse_alloc_conf(environ[var]), var
    return DEFAULT_CONFIG, ""


def roundup_power2_next_division(size, divisions):
    """`roundup_power2_next_division`: `size` up to the next of `divisions` equal steps between powers of two."""
    if _is_pow2(size):
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def round_size(nbytes, config=DEFAULT_CONFIG):
    """Bytes a request occupies in a block (`round_size`)."""
    if nbytes < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    divisions = config.divisions(nbytes)
    if divisions > 1 and nbytes > K_MIN_BLOCK_SIZE * divisions:
        return roundup_power2_next_division(nbytes, divisions)
    return K_MIN_BLOCK_SIZE * -(-nbytes // K_MIN_BLOCK_SIZE)


def allocation_size(rounded):
    """Bytes of the segment requested from the driver when no cached block fits (`get_allocation_size`)."""
    if rounded <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if rounded < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * -(-rounded // K_ROUND_LARGE)


class _Block:
    """A range of one segment: allocated, free (cached) or, in an expandable segment, not mapped."""

    __slots__ = ("seg", "addr", "size", "small", "stream", "allocated", "mapped", "prev", "next", "gc_base")

    def __init__(self, seg, addr, size, small, stream, mapped=True):
        self.seg, self.addr, self.size, self.small, self.stream = seg, addr, size, small, stream
        self.allocated, self.mapped = False, mapped
        self.prev = self.next = None
        self.gc_base = 0

    def is_split(self):
        return self.prev is not None or self.next is not None

    def key(self):
        return (self.size, self.addr)


class _Segment:
    """One cudaMalloc (or one expandable segment: a reserved address range mapped page by page)."""

    __slots__ = ("addr", "page", "mapped_pages", "expandable")

    def __init__(self, addr, page=0, expandable=False):
        self.addr, self.page, self.expandable = addr, page, expandable
        self.mapped_pages = set()


@dataclass
class AllocatorStats:
    """The counters torch.cuda.memory_stats() keeps that the simulation reproduces (bytes are integers)."""

    allocated_bytes: int = 0  # sum of allocated block sizes (memory_allocated)
    reserved_bytes: int = 0  # segments / mapped pages held from the driver (memory_reserved)
    requested_bytes: int = 0  # the unrounded requests behind the allocated blocks
    peak_allocated_bytes: int = 0
    peak_reserved_bytes: int = 0
    num_alloc_retries: int = 0  # cache releases that an allocation needed
    num_ooms: int = 0
    num_device_alloc: int = 0  # cudaMalloc / page-map calls
    num_device_free: int = 0
    phases: dict = field(default_factory=dict)  # phase → {"max_allocated_bytes", "max_reserved_bytes"}


class CachingAllocatorModel:
    """The native CUDA caching allocator of one device, replayed from malloc/free events.

        sim = CachingAllocatorModel(parse_alloc_conf("expandable_segments:True"), limit_bytes=24 * 2**30)
        sim.malloc("a", 3 << 20); sim.free("a"); sim.empty_cache()

    `limit_bytes`: what the device lets this process reserve (cudaMalloc fails beyond it), None for no limit.
    `fraction_limit`: the process is capped by `torch.cuda.set_per_process_memory_fraction` (which also turns
    on `garbage_collection_threshold`)."""

    def __init__(self, config=DEFAULT_CONFIG, limit_bytes=None, fraction_limit=False, address_space=1 << 50):
        self.config = config
        self.limit = limit_bytes
        self.fraction = fraction_limit
        self.address_space = address_space  # an expandable segment reserves this much address space
        self._free = {}  # (stream, small) → sorted [(size, addr)] of mapped free blocks
        self._by_addr = {}  # addr → free _Block (mapped)
        self._unmapped = {}  # (stream, small) → sorted [addr] of unmapped blocks (expandable segments)
        self._unmapped_by_addr = {}
        self._live = {}  # caller's key → allocated _Block
        self._expandable = {}  # (stream, small) → the _Segment that grows
        self._next_addr = 1 << 12
        self._gc_calls = {}  # (stream, small) → get_free_block calls (the age garbage collection reads)
        self.stats = AllocatorStats()
        self.phase = None

    # ---------------------------------------------------------------- bookkeeping
    @property
    def allocated_bytes(self):
        return self.stats.allocated_bytes

    @property
    def reserved_bytes(self):
        return self.stats.reserved_bytes

    @property
    def peak_allocated_bytes(self):
        return self.stats.peak_allocated_bytes

    @property
    def peak_reserved_bytes(self):
        return self.stats.peak_reserved_bytes

    def _bump(self):
        s = self.stats
        s.peak_allocated_bytes = max(s.peak_allocated_bytes, s.allocated_bytes)
        s.peak_reserved_bytes = max(s.peak_reserved_bytes, s.reserved_bytes)
        if self.phase is not None:
            ph = s.phases[self.phase]
            ph["max_allocated_bytes"] = max(ph["max_allocated_bytes"], s.allocated_bytes)
            ph["max_reserved_bytes"] = max(ph["max_reserved_bytes"], s.reserved_bytes)

    def mark(self, phase):
        """A phase begins: its peaks start from the current figures (as measurement resets the peak stats)."""
        self.phase = phase
        self.stats.phases.setdefault(phase, {"max_allocated_bytes": self.stats.allocated_bytes,
                                             "max_reserved_bytes": self.stats.reserved_bytes})
        self._bump()

    def _insert_free(self, b):
        b.gc_base = self._gc_calls.get((b.stream, b.small), 0)
        bisect.insort(self._free.setdefault((b.stream, b.small), []), b.key())
        self._by_addr[b.addr] = b

    def _remove_free(self, b):
        lst = self._free[(b.stream, b.small)]
        del lst[bisect.bisect_left(lst, b.key())]
        del self._by_addr[b.addr]

    def _insert_unmapped(self, b):
        bisect.insort(self._unmapped.setdefault((b.stream, b.small), []), b.addr)
        self._unmapped_by_addr[b.addr] = b

    def _remove_unmapped(self, b):
        lst = self._unmapped[(b.stream, b.small)]
        del lst[bisect.bisect_left(lst, b.addr)]
        del self._unmapped_by_addr[b.addr]

    def _new_address(self, size):
        addr = self._next_addr
        self._next_addr += -(-size // K_ROUND_LARGE) * K_ROUND_LARGE + K_ROUND_LARGE
        return addr

    # ---------------------------------------------------------------- malloc
    def malloc(self, key, nbytes, stream=0):
        """Allocate `nbytes` for `key` (a storage id) on `stream`; AllocatorOOM when the limit is reached.
        Zero-byte requests take no block (torch hands out no memory for them)."""
        if nbytes <= 0:
            return
        size = round_size(nbytes, self.config)
        small = size <= K_SMALL_SIZE
        pool = (stream, small)
        block = self._get_free_block(pool, size)
        if block is None:
            if self.fraction and self.config.garbage_collection_threshold > 0:
                self._garbage_collect()
            alloc = allocation_size(size)
            block = self._alloc_block(pool, size, alloc)
            if block is None and self._release_available_cached_blocks(pool, size):
                block = self._alloc_block(pool, size, alloc)
            if block is None:
                self._release_cached_blocks()
                self.stats.num_alloc_retries += 1
                block = self._alloc_block(pool, size, alloc)
            if block is None:
                self.stats.num_ooms += 1
                raise AllocatorOOM(alloc, self.stats.allocated_bytes, self.stats.reserved_bytes, self.limit)
        if self._should_split(block, size):
            rest = _Block(block.seg, block.addr + size, block.size - size, small, stream)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert_free(rest)
        block.allocated = True
        self._live[key] = (block, nbytes)
        self.stats.allocated_bytes += block.size
        self.stats.requested_bytes += nbytes
        self._bump()

    def _should_split(self, block, size):
        """`should_split`."""
        remaining = block.size - size
        if block.small or self.config.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self.config.max_split_size and remaining > K_SMALL_SIZE

    def _get_free_block(self, pool, size):
        """`get_free_block`: best fit in the pool, within the max_split_size rules; the block leaves the pool."""
        if self.fraction and self.config.garbage_collection_threshold > 0:
            self._gc_calls[pool] = self._gc_calls.get(pool, 0) + 1
        lst = self._free.get(pool)
        if not lst:
            return None
        i = bisect.bisect_left(lst, (size, -1))
        if i == len(lst):
            return None
        block = self._by_addr[lst[i][1]]
        if self._expandable_of(block) is not None:
            if self.config.expandable_segments:
                # A free block that can grow into the unmapped range after it counts as that large for best fit.
                def expandable_size(b):
                    return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)
                j = i + 1
                while self._expandable_of(block) is not None and j < len(lst):
                    nxt = self._by_addr[lst[j][1]]
                    if expandable_size(nxt) < expandable_size(block):
                        block, i = nxt, j
                        j += 1
                    else:
                        break
            else:
                j = i
                while j < len(lst) and self._expandable_of(self._by_addr[lst[j][1]]) is not None:
                    j += 1
                if j == len(lst):
                    return None
                block, i = self._by_addr[lst[j][1]], j
        cfg = self.config
        if size < cfg.max_split_size and block.size >= cfg.max_split_size:
            return None  # do not return an oversize block for a smaller request
        if size >= cfg.max_split_size and block.size >= size + cfg.max_non_split_rounding_size:
            return None
        self._remove_free(block)
        return block

    def _expandable_of(self, block):
        return block.seg if block.seg.expandable else None

    def _over_limit(self, nbytes):
        return self.limit is not None and self.stats.reserved_bytes + nbytes > self.limit

    def _alloc_block(self, pool, size, alloc):
        """`alloc_block`: a new segment (or mapped pages of the expandable one), or None where the limit refuses it."""
        if self.fraction and self._over_limit(alloc):
            return None
        if self.config.expandable_segments:
            return self._try_allocate_expandable(pool, size)
        if self._over_limit(alloc):
            return None
        seg = _Segment(self._new_address(alloc))
        block = _Block(seg, seg.addr, alloc, pool[1], pool[0])
        self.stats.reserved_bytes += alloc
        self.stats.num_device_alloc += 1
        return block

    # ---------------------------------------------------------------- expandable segments
    def _allocatable(self, b):
        return b is not None and not b.allocated

    def _find_expandable_block(self, pool, size):
        """`find_expandable_block`: the lowest-address free/unmapped run of at least `size` bytes, else a new segment."""
        for addr in list(self._unmapped.get(pool, ())):
            c = self._unmapped_by_addr[addr]
            if c.prev is not None and self._allocatable(c.prev) and c.prev.mapped:
                c = c.prev
            have, b = 0, c
            while have < size and self._allocatable(b):
                have += b.size
                b = b.next
            if have >= size:
                return c
        page = K_SMALL_BUFFER if pool[1] else K_LARGE_BUFFER
        seg = _Segment(self._new_address(self.address_space), page=page, expandable=True)
        block = _Block(seg, seg.addr, self.address_space, pool[1], pool[0], mapped=False)
        self._insert_unmapped(block)
        return block

    def _map_block(self, to_map, size):
        """`map_block`: back the first `size` bytes of an unmapped block with pages; False where the limit refuses."""
        seg = to_map.seg
        begin = (to_map.addr - seg.addr) // seg.page
        end = -(-(to_map.addr + size - seg.addr) // seg.page)
        mapped = (end - begin) * seg.page
        if self._over_limit(mapped):
            return False
        self._remove_unmapped(to_map)
        to_map.mapped = True
        seg.mapped_pages.update(range(begin, end))
        if mapped < to_map.size:
            rest = _Block(seg, to_map.addr + mapped, to_map.size - mapped, to_map.small, to_map.stream, mapped=False)
            rest.prev, rest.next = to_map, to_map.next
            if to_map.next is not None:
                to_map.next.prev = rest
            to_map.next = rest
            to_map.size = mapped
            self._insert_unmapped(rest)
        merged = self._merge(to_map, to_map.prev)
        merged = self._merge(merged, merged.next)
        self._insert_free(merged)
        self.stats.reserved_bytes += mapped
        self.stats.num_device_alloc += 1
        self._bump()
        return True

    def _try_allocate_expandable(self, pool, size):
        """`try_allocate_expandable_block`."""
        c = self._find_expandable_block(pool, size)
        if not c.mapped and not self._map_block(c, min(c.size, size)):
            return None
        while c.size < size:  # free → unmapped: map some of the next block, which merges the two into it
            nxt = c.next
            if not self._map_block(nxt, min(size - c.size, nxt.size)):
                return None
            c = nxt
        self._remove_free(c)
        return c

    def _merge(self, dst, src):
        """`try_merge_blocks` for a block not in any list: merge `src` into `dst` if both are free and equally mapped.
        Returns the surviving block (`dst`, grown)."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return dst
        if src.mapped:
            if src.addr not in self._by_addr or self._by_addr[src.addr] is not src:
                return dst
            self._remove_free(src)
        else:
            self._remove_unmapped(src)
        if src is dst.prev:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return dst

    def _unmap_block(self, block):
        """`unmap_block`: return the wholly free pages of a free block of an expandable segment."""
        seg = block.seg
        first = -(-(block.addr - seg.addr) // seg.page)
        last = (block.addr + block.size - seg.addr) // seg.page
        if first >= last:
            return
        self._remove_free(block)
        lo, hi = seg.addr + first * seg.page, seg.addr + last * seg.page
        if lo > block.addr:
            before = _Block(seg, block.addr, lo - block.addr, block.small, block.stream)
            before.prev, before.next = block.prev, block
            if block.prev is not None:
                block.prev.next = before
            block.prev = before
            self._insert_free(before)
        if hi < block.addr + block.size:
            after = _Block(seg, hi, block.addr + block.size - hi, block.small, block.stream)
            after.prev, after.next = block, block.next
            if block.next is not None:
                block.next.prev = after
            block.next = after
            self._insert_free(after)
        block.addr, block.size, block.mapped = lo, hi - lo, False
        seg.mapped_pages.difference_update(range(first, last))
        merged = self._merge(block, block.prev)
        merged = self._merge(merged, merged.next)
        self._insert_unmapped(merged)
        self.stats.reserved_bytes -= hi - lo
        self.stats.num_device_free += 1

    # ---------------------------------------------------------------- free and release
    def free(self, key):
        """Return `key`'s block to its pool, merging with free neighbours (`free_block`)."""
        entry = self._live.pop(key, None)
        if entry is None:
            return
        block, nbytes = entry
        self.stats.allocated_bytes -= block.size
        self.stats.requested_bytes -= nbytes
        block.allocated = False
        merged = self._merge(block, block.prev)
        merged = self._merge(merged, merged.next)
        self._insert_free(merged)

    def _release_block(self, block):
        """`release_block`: cudaFree an unsplit cached block."""
        self._remove_free(block)
        self.stats.reserved_bytes -= block.size
        self.stats.num_device_free += 1

    def _release_available_cached_blocks(self, pool, size):
        """`release_available_cached_blocks`: free oversize cached blocks to make room (only with max_split_size)."""
        cfg = self.config
        if cfg.max_split_size == NO_SPLIT_LIMIT:
            return False
        lst = self._free.get(pool, [])
        want = max(size, cfg.max_split_size)
        i = bisect.bisect_left(lst, (want, -1))
        if i < len(lst):
            self._release_block(self._by_addr[lst[i][1]])
            return True
        released = 0
        j = len(lst) - 1
        while released < want and j >= 0:
            b = self._by_addr[lst[j][1]]
            if b.size < cfg.max_split_size:
                break
            released += b.size
            self._release_block(b)
            j -= 1
        return released >= want

    def _release_cached_blocks(self):
        """`release_cached_blocks` (torch.cuda.empty_cache): free every unsplit cached block; unmap free pages."""
        for pool in list(self._free):
            for _, addr in list(self._free[pool]):
                b = self._by_addr.get(addr)
                if b is None:
                    continue
                if b.seg.expandable:
                    self._unmap_block(b)
                elif not b.is_split():
                    self._release_block(b)
        return True

    def empty_cache(self):
        """torch.cuda.empty_cache()."""
        self._release_cached_blocks()

    def _garbage_collect(self):
        """`garbage_collect_cached_blocks`: past the threshold share of the limit, free unsplit cached blocks of the
        large pools whose age (get_free_block calls since they were cached) is at least the average."""
        threshold = int(self.config.garbage_collection_threshold * (self.limit or 0))
        if self.stats.reserved_bytes <= threshold:
            return
        target = self.stats.reserved_bytes - threshold
        def candidates():
            out = []
            for (stream, small), lst in self._free.items():
                if small:
                    continue
                for _, addr in lst:
                    b = self._by_addr[addr]
                    if not b.is_split() and not b.seg.expandable:
                        out.append((self._gc_calls.get((stream, small), 0) - b.gc_base, b))
            return out
        cands = candidates()
        if not cands:
            return
        total_age, count = sum(a for a, _ in cands), len(cands)
        reclaimed, freed = 0, True
        while reclaimed < target and freed and count > 0:
            threshold_age = total_age / count
            freed = False
            for age, b in candidates():
                if age >= threshold_age:
                    freed = True
                    reclaimed += b.size
                    total_age -= age
                    count -= 1
                    self._release_block(b)


def replay(events, config=DEFAULT_CONFIG, limit_bytes=None, fraction_limit=False):
    """Run an allocation stream through a fresh simulated allocator; return its AllocatorStats.

    `events`: ("malloc", key, nbytes[, stream]) | ("free", key) | ("mark", phase) | ("empty_cache",)."""
    sim = CachingAllocatorModel(config, limit_bytes, fraction_limit)
    for ev in events:
        kind = ev[0]
        if kind == "malloc":
            sim.malloc(ev[1], ev[2], *ev[3:])
        elif kind == "free":
            sim.free(ev[1])
        elif kind == "mark":
            sim.mark(ev[1])
        elif kind == "empty_cache":
            sim.empty_cache()
        else:
            raise ValueError(f"unknown allocator event {kind!r}")
    return sim.stats


