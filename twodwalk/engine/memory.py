"""Physical memory: the one store that holds every byte of the simulated host.

Host page tables, the EPT tables KVM builds, the frames backing guest RAM and therefore the
guest's own page tables all live here, as they do in a real machine's DRAM. Memory is sparse
(a dict of 4 KiB frames, created on first write) so a 2**46-byte address space costs only the
frames actually touched; reading a frame never written returns zeros.

Paging structures are read 8 bytes at a time, little-endian (SDM Vol 3A 4.5: "each entry is
64 bits"), so `read_u64`/`write_u64` are the fast path used by the walker.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from twodwalk.engine.units import PAGE_SHIFT, PAGE_SIZE
from twodwalk.errors import AddressError, TwodwalkError, check_aligned, check_int

_U64 = struct.Struct("<Q")
_ZERO_FRAME = bytes(PAGE_SIZE)
U64_LIMIT = 1 << 64


class PhysicalMemory:
    """Sparse byte-addressable physical memory below 2**maxphyaddr, in 4 KiB frames."""

    def __init__(self, maxphyaddr: int = 46) -> None:
        check_int("maxphyaddr", maxphyaddr, 12, 65, valid="12..64")
        self.maxphyaddr = maxphyaddr
        self.limit = 1 << maxphyaddr
        self._frames: dict[int, bytearray] = {}

    def _check(self, address: int, size: int) -> None:
        if isinstance(address, bool) or not isinstance(address, int):
            raise TwodwalkError(f"physical address must be an integer, got {address!r}")
        check_int("size", size, 0, self.limit + 1, valid=f"0 <= size <= {self.limit:#x}")
        if address < 0 or address + size > self.limit:
            raise AddressError(
                f"physical address {address:#x} (+{size} bytes) is outside physical memory:"
                f" valid addresses are 0..{self.limit - 1:#x} (MAXPHYADDR={self.maxphyaddr})"
            )

    def read_u64(self, address: int) -> int:
        """Read an 8-byte little-endian entry; `address` must be 8-byte aligned."""
        if type(address) is not int or address & 7 or not 0 <= address < self.limit:
            self._check(address, 8)
            check_aligned("entry address", address, 8)
        frame = self._frames.get(address >> PAGE_SHIFT)
        if frame is None:
            return 0
        value: int = _U64.unpack_from(frame, address & (PAGE_SIZE - 1))[0]
        return value

    def entry_reader(self) -> Callable[[int, object], tuple[int, None]]:
        """`read_u64` without its checks, in the shape of a walker's `read_entry` (the value,
        and None: read at its own address): for a walker whose addresses are aligned and in
        range by construction (a checked root or a masked table address, plus 8 * index).
        A closure, so that each entry a walk reads costs one call."""
        frames, unpack = self._frames, _U64.unpack_from

        def read_entry(address: int, access: object) -> tuple[int, None]:
            frame = frames.get(address >> PAGE_SHIFT)
            if frame is None:
                return 0, None
            value: int = unpack(frame, address & 0xFFF)[0]
            return value, None

        return read_entry

    def write_u64(self, address: int, value: int) -> None:
        """Write an 8-byte little-endian entry; `address` must be 8-byte aligned."""
        self._check(address, 8)
        check_aligned("entry address", address, 8)
        check_int("entry value", value, 0, U64_LIMIT, valid="0 <= value < 2**64")
        _U64.pack_into(self._frame(address >> PAGE_SHIFT), address & (PAGE_SIZE - 1), value)

    def read(self, address: int, size: int) -> bytes:
        """Read `size` bytes, which may span frames."""
        offset = address & (PAGE_SIZE - 1) if type(address) is int else -1
        fits = type(size) is int and 0 < size <= PAGE_SIZE - offset
        if offset >= 0 and fits and address >= 0 and address + size <= self.limit:
            frame = self._frames.get(address >> PAGE_SHIFT, _ZERO_FRAME)
            return bytes(frame[offset : offset + size])
        self._check(address, size)
        out = bytearray()
        for pfn, start, end in page_pieces(address, size):
            frame = self._frames.get(pfn, _ZERO_FRAME)
            out += frame[start:end]
        return bytes(out)

    def write(self, address: int, data: bytes) -> None:
        """Write bytes, which may span frames."""
        offset = address & (PAGE_SIZE - 1) if type(address) is int else -1
        size = len(data)
        if 0 <= offset <= PAGE_SIZE - size and address >= 0 and address + size <= self.limit:
            self._frame(address >> PAGE_SHIFT)[offset : offset + size] = data  # within a frame
            return
        self._check(address, size)
        done = 0
        for pfn, start, end in page_pieces(address, len(data)):
            self._frame(pfn)[start:end] = data[done : done + end - start]
            done += end - start

    def copy_frame(self, source: int, destination: int) -> None:
        """Copy one whole 4 KiB frame (what the host does to migrate or CoW a page)."""
        data = self.read(check_aligned("source", source, PAGE_SIZE), PAGE_SIZE)
        self.write(check_aligned("destination", destination, PAGE_SIZE), data)

    def zero_frame(self, address: int) -> None:
        """Clear a frame: a zero frame costs no storage, so it is simply dropped."""
        self._check(check_aligned("frame address", address, PAGE_SIZE), PAGE_SIZE)
        self._frames.pop(address >> PAGE_SHIFT, None)

    def touched_frames(self) -> Iterator[int]:
        """Physical addresses of the frames that hold data, in ascending order."""
        return (pfn << PAGE_SHIFT for pfn in sorted(self._frames))

    def _frame(self, pfn: int) -> bytearray:
        frame = self._frames.get(pfn)
        if frame is None:
            frame = self._frames[pfn] = bytearray(PAGE_SIZE)
        return frame


def page_pieces(address: int, size: int) -> Iterator[tuple[int, int, int]]:
    """Split [address, address+size) into (page number, start, end) pieces within pages."""
    while size > 0:
        start = address & (PAGE_SIZE - 1)
        end = min(PAGE_SIZE, start + size)
        yield address >> PAGE_SHIFT, start, end
        address += end - start
        size -= end - start


class FrameAllocator:
    """Hands out zeroed frames of `frame_size` bytes (4 KiB, or 2 MiB for huge pages) from
    [first, limit), lowest first, as a kernel's buddy allocator would; the most recently freed
    frame is reused first (like the per-CPU free lists), so a freed frame is soon someone
    else's."""

    def __init__(
        self, memory: PhysicalMemory, first: int, limit: int, frame_size: int = PAGE_SIZE
    ) -> None:
        if frame_size <= 0 or frame_size % PAGE_SIZE:
            raise TwodwalkError(f"frame_size={frame_size!r} must be a multiple of {PAGE_SIZE}")
        check_aligned("first", check_int("first", first, 0, memory.limit), frame_size)
        check_aligned("limit", check_int("limit", limit, first + 1, memory.limit + 1), frame_size)
        self.memory = memory
        self.first = first
        self.limit = limit
        self.frame_size = frame_size
        self._next = first
        self._free: list[int] = []
        self.allocated: set[int] = set()

    def alloc(self) -> int:
        """Return the address of a zeroed frame; raise MemoryError when none is left."""
        if self._free:
            address = self._free.pop()
        elif self._next < self.limit:
            address, self._next = self._next, self._next + self.frame_size
        else:
            raise MemoryError(
                f"out of frames: all {(self.limit - self.first) // self.frame_size} frames in"
                f" [{self.first:#x}, {self.limit:#x}) are allocated"
            )
        for page in range(address, address + self.frame_size, PAGE_SIZE):
            self.memory.zero_frame(page)
        self.allocated.add(address)
        return address

    def owns(self, address: int) -> bool:
        """Whether `address` lies in this allocator's range."""
        return self.first <= address < self.limit

    def free(self, address: int) -> None:
        """Return a frame to the allocator (its contents stay until it is handed out again)."""
        if address not in self.allocated:
            raise TwodwalkError(f"frame {address:#x} was not allocated by this allocator")
        self.allocated.remove(address)
        self._free.append(address)
