"""A model of PyTorch's CUDA caching allocator: from allocations in order to memory reserved.

A trace gives the peak of live tensors, ``torch.cuda.max_memory_allocated()``. What a GPU must
hold is ``max_memory_reserved()``: the segments the caching allocator took from the driver, more
because of segment sizes, splitting and fragmentation. :func:`replay` runs the allocator's rules
(``DeviceCachingAllocator`` in ``c10/cuda/CUDACachingAllocator.cpp``, constants from
``c10/core/AllocatorConfig.h``) over allocations and frees in order, and reports both. Modelled:

* ``round_size``: 512 B blocks (``kMinBlockSize``), or ``roundup_power2_divisions`` when set;
  ``get_pool``: rounded sizes up to 1 MiB (``kSmallSize``) in the small pool, others in the large;
* ``get_allocation_size``: a new segment is 2 MiB (``kSmallBuffer``) in the small pool,
  ``large_segment_size`` (20 MiB, ``kLargeBuffer``) below 10 MiB (``kMinLargeAlloc``), else the
  size rounded up to 2 MiB (``kRoundLarge``);
* ``get_free_block``: best fit on (size, address) among cached blocks, with the oversize rules: a
  request below ``max_split_size`` never takes a block of at least that size, a larger one only a
  block smaller than its size + ``max_non_split_rounding_size`` (20 MiB, once ``kLargeBuffer``);
* ``should_split`` / ``alloc_found_block``: the request takes the low addresses; the rest stays
  cached if at least 512 B (small pool, or expandable segments) or, in the large pool, above
  1 MiB for a request below ``max_split_size``. An unsplit block counts whole as allocated;
* ``free_block`` / ``try_merge_blocks``: a freed block merges with its free neighbours;
* ``malloc``'s retries when a segment would go past ``capacity``: ``alloc_block``,
  ``release_available_cached_blocks`` (oversize segments, with ``max_split_size`` only), then
  ``release_cached_blocks`` (every cached unsplit segment, and free expandable pages), then OOM;
* ``expandable_segments:True`` (``ExpandableSegment``, ``find_expandable_block``, ``map_block``,
  ``try_allocate_expandable_block``, ``unmap_block``): one segment per pool, grown by pages of
  2 MiB (small) or ``large_segment_size`` (large); reserved is what is mapped; best fit counts a
  block before unmapped pages as large as it could grow.

Not modelled:

* more than one stream (the training step's default stream only): no ``record_stream``, events or
  CUDA graph pools; ``empty_cache()`` called by the program;
* ``garbage_collection_threshold`` and ``per_process_memory_fraction`` (read and listed in
  :attr:`AllocatorStats.unmodelled`; the collector needs a memory fraction), and
  ``backend:cudaMallocAsync`` (listed; the native allocator is simulated);
* real addresses: ``cudaMalloc`` here returns fresh ascending ones, the driver may reuse freed
  ranges, which changes only ties between cached blocks of equal size;
* ``capacity`` is one number (free memory less the CUDA context): the driver's fragmentation and
  other processes are not seen; an expandable segment's address space is 1 1/8 of it, where
  ``ExpandableSegment`` takes 1 1/8 of the device's total memory.

The CPU wheel ships no CUDA sources: the rules were read from ``CUDACachingAllocator.cpp`` at
commit eb42ad6 with the later ``max_non_split_rounding_size`` and ``large_segment_size`` terms,
and ``AcceleratorAllocatorConfig::parseArgs`` in ``c10/core/AllocatorConfig.cpp``; the keys and
environment variables match the installed 2.13 headers and ``libc10.so``. No GPU was at hand to
compare :func:`replay` with ``torch.cuda.memory_stats()``.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from typing import Any

from memguard.errors import ConfigError
from memguard.estimation.allocator_config import AllocatorConfig

__all__ = ["FREE", "AllocatorConfig", "AllocatorStats", "Block", "Simulator", "ledger_events", "replay"]

FREE = -1
"""The ``nbytes`` of an event that frees the block allocated under the same key."""

_MiB = 1 << 20
_MIN_BLOCK = 512  # kMinBlockSize
_SMALL_SIZE = _MiB  # kSmallSize: the largest small-pool request
_SMALL_BUFFER = 2 * _MiB  # kSmallBuffer: a small segment, a small expandable page
_MIN_LARGE_ALLOC = 10 * _MiB  # kMinLargeAlloc
_ROUND_LARGE = 2 * _MiB  # kRoundLarge
_LARGE_BUFFER = 20 * _MiB  # kLargeBuffer, the default large_segment_size
_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB .. 64 GiB
_NO_LIMIT = 1 << 64  # std::numeric_limits<size_t>::max()
_VA_UNBOUNDED = 1 << 50  # an expandable segment's address space without a capacity
@dataclasses.dataclass(frozen=True)
class AllocatorStats:
    """What the caching allocator would have done over a replay (integer bytes).

    Attributes:
        peak_allocated: ``max_memory_allocated()``: the most bytes in allocated blocks, an unsplit
            block counted whole.
        peak_reserved: ``max_memory_reserved()``: the most bytes held in segments.
        final_reserved: bytes held in segments after the last event.
        segments: segments held when ``peak_reserved`` was first reached (an expandable segment
            counts as one).
        final_segments: segments held after the last event.
        final_allocated: bytes in allocated blocks after the last event.
        peak_requested: the most bytes requested and live, before rounding.
        cache_flushes: how often ``release_cached_blocks`` ran because a segment did not fit.
        oom_event: index of the event that did not fit in ``capacity`` (the replay stopped
            there), or ``None``.
        oom_bytes: the size requested by that event.
        unmodelled: settings given that are not modelled.
    """

    peak_allocated: int
    peak_reserved: int
    final_reserved: int
    segments: int
    final_segments: int
    peak_requested: int
    final_allocated: int = 0
    cache_flushes: int = 0
    oom_event: int | None = None
    oom_bytes: int = 0
    unmodelled: tuple[str, ...] = ()

    @property
    def overhead(self) -> float:
        """``peak_reserved / peak_allocated - 1``: what the allocator adds over its blocks."""
        return self.peak_reserved / self.peak_allocated - 1 if self.peak_allocated else 0.0


class Block:
    """A range of a segment (``Block``): allocated, cached (mapped, free) or unmapped.

    ``segment`` is ``None`` for a ``cudaMalloc`` segment, ``(base address, page size)`` for an
    expandable one.
    """

    __slots__ = ("addr", "allocated", "mapped", "next", "prev", "requested", "segment", "size", "small")

    def __init__(self, addr: int, size: int, small: bool, segment: tuple[int, int] | None = None,
                 mapped: bool = True) -> None:
        self.addr, self.size, self.small, self.segment, self.mapped = addr, size, small, segment, mapped
        self.allocated = False
        self.prev: Block | None = None
        self.next: Block | None = None
        self.requested = 0


def _splice(block: Block, before: Block | None, after: Block | None) -> None:
    """``Block::splice``: put ``block`` between ``before`` and ``after``."""
    block.prev, block.next = before, after
    if before is not None:
        before.next = block
    if after is not None:
        after.prev = block


_SHIFT = 64  # a cached block's key is size << 64 | address: sorted as BlockComparatorSize
_MASK = (1 << _SHIFT) - 1


class _Pool:
    """``BlockPool``: cached blocks sorted by (size, address), unmapped blocks by address."""

    __slots__ = ("blocks", "keys", "small", "unmapped")

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[int] = []
        self.blocks: dict[int, Block] = {}
        self.unmapped: dict[int, Block] = {}

    def add(self, b: Block) -> None:
        insort(self.keys, b.size << _SHIFT | b.addr)
        self.blocks[b.addr] = b

    def remove(self, b: Block) -> None:
        keys = self.keys
        del keys[bisect_left(keys, b.size << _SHIFT | b.addr)]
        del self.blocks[b.addr]


class Simulator:
    """``DeviceCachingAllocator`` for one device and one stream; sizes and addresses in bytes.

    One method per function of ``CUDACachingAllocator.cpp`` it follows, under the same name, so
    that each can be read against its C++ original.
    """

    def __init__(self, config: AllocatorConfig, capacity: int | None) -> None:
        self.config, self.capacity = config, capacity
        self.large, self.small = _Pool(False), _Pool(True)
        self.expandable = config.expandable_segments
        self.split_limit = config.max_split_size or _NO_LIMIT
        self.rounding_limit = config.max_non_split_rounding_size or config.large_segment_size
        self.power2 = any(d > 1 for d in config.roundup_power2_divisions)
        self.next_addr = _SMALL_BUFFER  # cudaMalloc's next address
        self.allocated = self.reserved = self.requested = self.segments = 0
        self.peak_allocated = self.peak_reserved = self.peak_requested = self.peak_segments = 0
        self.flushes = 0

    def round_size(self, n: int) -> int:
        """``round_size`` (with ``roundup_power2_next_division``)."""
        if n < _MIN_BLOCK:
            return _MIN_BLOCK
        if self.power2:
            d = self.config.roundup_power2_divisions[min(max(n.bit_length() - 21, 0), _INTERVALS - 1)]
            if d > 1 and n > _MIN_BLOCK * d:
                if n & (n - 1) == 0:
                    return n
                step = (1 << (n.bit_length() - 1)) >> (d.bit_length() - 1)
                return -(-n // step) * step
        return (n + _MIN_BLOCK - 1) & -_MIN_BLOCK

    def malloc(self, n: int) -> Block | None:
        """``DeviceCachingAllocator::malloc``: reuse, new segment, release and retry, or ``None``."""
        size = self.round_size(n)
        small = size <= _SMALL_SIZE
        pool = self.small if small else self.large
        block = self.get_free_block(pool, size)
        if block is None:
            if small:
                alloc_size = _SMALL_BUFFER
            elif size < _MIN_LARGE_ALLOC:
                alloc_size = self.config.large_segment_size
            else:
                alloc_size = -(-size // _ROUND_LARGE) * _ROUND_LARGE
            block = (self.alloc_block(pool, size, alloc_size)
                     or (self.release_available_cached_blocks(pool, size) and self.alloc_block(pool, size, alloc_size))
                     or (self.release_cached_blocks() and self.alloc_block(pool, size, alloc_size)))
            if not block:
                return None
        rest = block.size - size
        if rest >= _MIN_BLOCK if small or self.expandable else (size < self.split_limit and rest > _SMALL_SIZE):
            # alloc_found_block: the request takes the low addresses, the rest stays cached.
            used = Block(block.addr, size, small, block.segment)
            _splice(used, block.prev, block)
            block.addr += size
            block.size = rest
            pool.add(block)
            block = used
        block.allocated = True
        block.requested = n
        self.allocated += block.size
        self.requested += n
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        if self.requested > self.peak_requested:
            self.peak_requested = self.requested
        return block

    def free(self, block: Block) -> None:
        """``free`` then ``free_block``: merge with free neighbours and cache."""
        self.allocated -= block.size
        self.requested -= block.requested
        block.allocated = False
        pool = self.small if block.small else self.large
        self.try_merge_blocks(block, block.prev, pool)
        self.try_merge_blocks(block, block.next, pool)
        pool.add(block)

    def try_merge_blocks(self, dst: Block, src: Block | None, pool: _Pool) -> None:
        """``try_merge_blocks``: ``dst`` (in no set) absorbs ``src`` if free and mapped alike."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        if src.mapped:
            pool.remove(src)
        else:
            del pool.unmapped[src.addr]
        if dst.prev is src:
            dst.addr = src.addr
            _splice(dst, src.prev, dst.next)
        else:
            _splice(dst, dst.prev, src.next)
        dst.size += src.size

    def get_free_block(self, pool: _Pool, size: int) -> Block | None:
        """``get_free_block``: best fit on (size, address), within the oversize rules."""
        keys = pool.keys
        i = bisect_left(keys, size << _SHIFT)
        if i == len(keys):
            return None
        block = pool.blocks[keys[i] & _MASK]
        if block.segment is not None:
            # A block before unmapped pages counts as large as it could grow.
            while i + 1 < len(keys):
                following = pool.blocks[keys[i + 1] & _MASK]
                if _expandable_size(following) >= _expandable_size(block):
                    break
                i, block = i + 1, following
        if size < self.split_limit <= block.size or (
                size >= self.split_limit and block.size >= size + self.rounding_limit):
            return None
        del keys[i]
        del pool.blocks[block.addr]
        return block

    def reserve(self, n: int) -> None:
        self.reserved += n
        if self.reserved > self.peak_reserved:
            self.peak_reserved, self.peak_segments = self.reserved, self.segments

    def alloc_block(self, pool: _Pool, size: int, alloc_size: int) -> Block | None:
        """``alloc_block``: a new segment (``cudaMalloc``), or pages of the expandable one."""
        if self.expandable:
            return self.try_allocate_expandable_block(pool, size)
        if self.capacity is not None and self.reserved + alloc_size > self.capacity:
            return None
        block = Block(self.next_addr, alloc_size, pool.small)
        self.next_addr += alloc_size
        self.segments += 1
        self.reserve(alloc_size)
        return block

    def release_block(self, pool: _Pool, block: Block) -> None:
        """``release_block``: ``cudaFree`` a whole cached segment."""
        pool.remove(block)
        self.segments -= 1
        self.reserved -= block.size

    def release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """``release_available_cached_blocks``: free oversize cached segments, enough for ``size``."""
        limit = self.split_limit
        if limit == _NO_LIMIT:
            return False
        want = max(size, limit)
        keys = pool.keys
        i = bisect_left(keys, want << _SHIFT)
        if i < len(keys) and pool.blocks[keys[i] & _MASK].segment is None:
            self.release_block(pool, pool.blocks[keys[i] & _MASK])
            return True
        released = 0
        for key in reversed(keys[:i]):  # the largest first
            block = pool.blocks[key & _MASK]
            if released >= want or block.size < limit:
                break
            if block.segment is None:
                self.release_block(pool, block)
                released += block.size
        return released >= want

    def release_cached_blocks(self) -> bool:
        """``release_cached_blocks``: free every cached unsplit segment, unmap free pages."""
        self.flushes += 1
        for pool in (self.large, self.small):
            to_unmap = []
            for block in [pool.blocks[k & _MASK] for k in pool.keys]:
                if block.segment is not None:
                    to_unmap.append(block)
                elif block.prev is None and block.next is None:
                    self.release_block(pool, block)
            for block in to_unmap:
                self.unmap_block(pool, block)
                if not block.mapped and block.prev is None and block.next is None:  # release_expandable_segment
                    del pool.unmapped[block.addr]
                    self.segments -= 1
        return True

    def try_allocate_expandable_block(self, pool: _Pool, size: int) -> Block | None:
        """``try_allocate_expandable_block``: map pages at the lowest address with room."""
        candidate = self.find_expandable_block(pool, size)
        if not candidate.mapped and not self.map_block(pool, candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            following = candidate.next
            assert following is not None  # find_expandable_block checked the room
            if not self.map_block(pool, following, min(size - candidate.size, following.size)):
                return None
            candidate = following  # which absorbed the candidate
        pool.remove(candidate)
        return candidate

    def find_expandable_block(self, pool: _Pool, size: int) -> Block:
        """``find_expandable_block``: the first unmapped range (with a free block before it) that fits."""
        for addr in sorted(pool.unmapped):
            candidate = pool.unmapped[addr]
            if candidate.prev is not None and not candidate.prev.allocated:
                candidate = candidate.prev
            room, b = 0, candidate
            while b is not None and not b.allocated and room < size:
                room, b = room + b.size, b.next
            if room >= size:
                return candidate
        page = _SMALL_BUFFER if pool.small else self.config.large_segment_size
        # ExpandableSegment reserves address space for 1 1/8 of the device's memory.
        space = _VA_UNBOUNDED if self.capacity is None else self.capacity + self.capacity // 8
        block = Block(self.next_addr, -(-space // page) * page, pool.small, (self.next_addr, page), mapped=False)
        self.next_addr += block.size
        self.segments += 1
        pool.unmapped[block.addr] = block
        return block

    def map_block(self, pool: _Pool, block: Block, size: int) -> bool:
        """``map_block``: back the first ``size`` bytes (whole pages) of an unmapped block."""
        page = block.segment[1]  # type: ignore[index]
        mapped = -(-size // page) * page
        if self.capacity is not None and self.reserved + mapped > self.capacity:
            return False
        del pool.unmapped[block.addr]
        block.mapped = True
        if mapped < block.size:
            rest = Block(block.addr + mapped, block.size - mapped, pool.small, block.segment, mapped=False)
            _splice(rest, block, block.next)
            pool.unmapped[rest.addr] = rest
            block.size = mapped
        self.try_merge_blocks(block, block.prev, pool)
        self.try_merge_blocks(block, block.next, pool)
        pool.add(block)
        self.reserve(mapped)
        return True

    def unmap_block(self, pool: _Pool, block: Block) -> None:
        """``unmap_block``: give back the whole pages inside a cached expandable block."""
        segment = block.segment
        assert segment is not None
        base, page = segment
        start = base + -(-(block.addr - base) // page) * page
        end = base + (block.addr + block.size - base) // page * page
        if start >= end:
            return
        pool.remove(block)
        if start > block.addr:
            before = Block(block.addr, start - block.addr, pool.small, segment)
            _splice(before, block.prev, block)
            pool.add(before)
        if block.addr + block.size > end:
            after = Block(end, block.addr + block.size - end, pool.small, segment)
            _splice(after, block, block.next)
            pool.add(after)
        block.addr, block.size, block.mapped = start, end - start, False
        self.try_merge_blocks(block, block.prev, pool)
        self.try_merge_blocks(block, block.next, pool)
        pool.unmapped[block.addr] = block
        self.reserved -= end - start

    def stats(self, oom_event: int | None = None, oom_bytes: int = 0) -> AllocatorStats:
        return AllocatorStats(
            peak_allocated=self.peak_allocated, peak_reserved=self.peak_reserved,
            final_reserved=self.reserved, segments=self.peak_segments, final_segments=self.segments,
            peak_requested=self.peak_requested, final_allocated=self.allocated, cache_flushes=self.flushes,
            oom_event=oom_event, oom_bytes=oom_bytes, unmodelled=self.config.unmodelled)


def _expandable_size(b: Block) -> int:
    nxt = b.next
    return b.size + (nxt.size if nxt is not None and not nxt.mapped else 0)


def replay(events: Iterable[tuple[int, int]], config: AllocatorConfig | None = None, *,
           capacity: int | None = None) -> AllocatorStats:
    """Run the caching allocator over allocations and frees, in order, and report its peaks.

    Args:
        events: ``(key, nbytes)`` pairs. ``nbytes >= 0`` allocates a block of ``nbytes`` (the size
            requested, before rounding; 0 allocates nothing, as in PyTorch) under ``key``, which
            must not be live; ``nbytes == FREE`` (-1) frees the block allocated under ``key``.
        config: the allocator's settings; ``None`` is PyTorch's defaults (not the environment:
            pass :meth:`AllocatorConfig.from_env` for that).
        capacity: bytes the allocator may reserve (the device's free memory); ``None``: no
            limit. When a segment would go past it, cached segments are released and the
            request retried; if it still does not fit, the replay stops at that event.

    Returns:
        The peaks, final state and, if it ran out of ``capacity``, where.

    Raises:
        ConfigError: for a free of a key that is not live, an allocation under a live key, a
            negative size other than ``FREE``, or a capacity that is not positive.
    """
    if capacity is not None and capacity <= 0:
        raise ConfigError(f"capacity must be a positive number of bytes or None, got {capacity!r}")
    sim = Simulator(config or AllocatorConfig(), capacity)
    live: dict[int, Block | None] = {}
    malloc, free = sim.malloc, sim.free
    for index, (key, nbytes) in enumerate(events):
        if nbytes > 0:
            if key in live:
                raise ConfigError(f"event {index}: key {key!r} is allocated again before its free")
            block = malloc(nbytes)
            if block is None:
                return sim.stats(index, nbytes)
            live[key] = block
        elif nbytes == FREE:
            block = live.pop(key, False)  # type: ignore[arg-type]
            if block is False:
                raise ConfigError(f"event {index}: frees key {key!r}, which is not allocated")
            if block is not None:
                free(block)
        elif nbytes == 0:
            if key in live:
                raise ConfigError(f"event {index}: key {key!r} is allocated again before its free")
            live[key] = None
        else:
            raise ConfigError(f"event {index}: nbytes must be >= 0 or FREE (-1), got {nbytes!r}")
    return sim.stats()


def ledger_events(records: Iterable[Any], sizes: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Events for :func:`replay` from ledger records (``nbytes``, ``alloc`` and ``free`` clocks).

    Each record's index is its key; a record whose ``free`` is ``None`` stays live to the end.
    ``sizes``, where given, are the bytes of each record in place of its ``nbytes``.
    Written for ``memguard.estimation.trace.ledger.Ledger.records``, whose clocks are unique.
    """
    timeline: list[tuple[int, int, int]] = []
    for i, r in enumerate(records):
        timeline.append((r.alloc, i, r.nbytes if sizes is None else sizes[i]))
        if r.free is not None:
            timeline.append((r.free, i, FREE))
    timeline.sort()
    return [(i, n) for _, i, n in timeline]
