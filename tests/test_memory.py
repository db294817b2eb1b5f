"""PhysicalMemory and FrameAllocator: sparse little-endian storage and zeroed 4 KiB frames."""

from __future__ import annotations

import re

import pytest

from twodwalk import PAGE_SIZE, AddressError, FrameAllocator, PhysicalMemory, TwodwalkError

# --- PhysicalMemory: reading and writing -----------------------------------------------------


def test_never_written_memory_reads_zero() -> None:
    memory = PhysicalMemory(46)
    assert memory.read_u64(0) == 0
    assert memory.read_u64(0x1234_5678_9000) == 0
    assert memory.read_u64((1 << 46) - 8) == 0
    assert memory.read(0, 16) == bytes(16)
    assert memory.read(0x7FF8, 32) == bytes(32)  # spanning two never-written frames
    assert list(memory.touched_frames()) == []


def test_reading_never_written_memory_allocates_nothing() -> None:
    memory = PhysicalMemory(46)
    memory.read_u64(0x5000)
    memory.read(0x9000, 3 * PAGE_SIZE)
    assert list(memory.touched_frames()) == []


def test_write_u64_is_little_endian() -> None:
    memory = PhysicalMemory(46)
    memory.write_u64(0x2008, 0x0102_0304_0506_0708)
    assert memory.read(0x2008, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert memory.read_u64(0x2008) == 0x0102_0304_0506_0708
    # Neighbouring entries are untouched.
    assert memory.read_u64(0x2000) == 0
    assert memory.read_u64(0x2010) == 0


def test_bytes_written_are_read_back_as_little_endian_u64() -> None:
    memory = PhysicalMemory(46)
    memory.write(0x3010, bytes([0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]))
    assert memory.read_u64(0x3010) == 0x8877_6655_4433_2211


def test_write_u64_full_range_values() -> None:
    memory = PhysicalMemory(46)
    memory.write_u64(0, (1 << 64) - 1)
    assert memory.read(0, 8) == b"\xff" * 8
    assert memory.read_u64(0) == (1 << 64) - 1
    memory.write_u64(0, 0)
    assert memory.read_u64(0) == 0


def test_read_and_write_span_frame_boundaries() -> None:
    memory = PhysicalMemory(46)
    data = bytes(range(1, 33))
    memory.write(0x1FF0, data)  # 16 bytes in frame 0x1000, 16 in frame 0x2000
    assert memory.read(0x1FF0, 32) == data
    assert memory.read(0x1FF0, 16) == data[:16]
    assert memory.read(0x2000, 16) == data[16:]
    assert list(memory.touched_frames()) == [0x1000, 0x2000]
    assert memory.read_u64(0x1FF8) == int.from_bytes(data[8:16], "little")
    assert memory.read_u64(0x2000) == int.from_bytes(data[16:24], "little")


def test_write_spanning_three_frames() -> None:
    memory = PhysicalMemory(46)
    data = bytes(i & 0xFF for i in range(PAGE_SIZE + 20))
    memory.write(0x4FF6, data)
    assert memory.read(0x4FF6, len(data)) == data
    assert list(memory.touched_frames()) == [0x4000, 0x5000, 0x6000]
    assert memory.read(0x4000, 0xFF6) == bytes(0xFF6)  # bytes before the write stay zero


def test_last_entry_below_the_limit_is_usable() -> None:
    memory = PhysicalMemory(36)
    top = (1 << 36) - 8
    memory.write_u64(top, 0xDEAD_BEEF)
    assert memory.read_u64(top) == 0xDEAD_BEEF
    assert memory.read((1 << 36) - 1, 1) == b"\x00"


# --- PhysicalMemory: rejected addresses and values -------------------------------------------


@pytest.mark.parametrize("maxphyaddr", [36, 46, 52])
def test_address_at_limit_rejected_naming_address_and_limit(maxphyaddr: int) -> None:
    memory = PhysicalMemory(maxphyaddr)
    limit = 1 << maxphyaddr
    pattern = rf"{limit:#x}.*{limit - 1:#x}.*MAXPHYADDR={maxphyaddr}"
    with pytest.raises(AddressError, match=pattern):
        memory.read_u64(limit)
    with pytest.raises(AddressError, match=pattern):
        memory.write_u64(limit, 1)
    with pytest.raises(AddressError, match=pattern):
        memory.read(limit, 1)
    with pytest.raises(AddressError, match=pattern):
        memory.write(limit, b"\x01")


def test_address_far_above_limit_rejected() -> None:
    memory = PhysicalMemory(46)
    with pytest.raises(AddressError, match=r"0x1000000000000000 .*outside physical memory"):
        memory.read_u64(1 << 60)
    with pytest.raises(AddressError, match="outside physical memory"):
        memory.write_u64(1 << 64, 0)


def test_access_running_past_the_limit_rejected() -> None:
    memory = PhysicalMemory(40)
    limit = 1 << 40
    with pytest.raises(AddressError, match=rf"{limit - 4:#x} \(\+8 bytes\)"):
        memory.read(limit - 4, 8)
    with pytest.raises(AddressError, match="MAXPHYADDR=40"):
        memory.write(limit - 1, b"ab")
    assert list(memory.touched_frames()) == []


@pytest.mark.parametrize("address", [-1, -8, -PAGE_SIZE, -(1 << 64)])
def test_negative_address_rejected(address: int) -> None:
    memory = PhysicalMemory(46)
    pattern = re.escape(f"{address:#x}") + ".*MAXPHYADDR=46"
    with pytest.raises(AddressError, match=pattern):
        memory.read_u64(address)
    with pytest.raises(AddressError, match=pattern):
        memory.write_u64(address, 0)
    with pytest.raises(AddressError, match=pattern):
        memory.read(address, 1)
    with pytest.raises(AddressError, match=pattern):
        memory.write(address, b"x")
    assert list(memory.touched_frames()) == []


@pytest.mark.parametrize("address", [1, 4, 7, 0x1004, 0x2FFF])
def test_unaligned_entry_address_rejected(address: int) -> None:
    memory = PhysicalMemory(46)
    pattern = rf"entry address={address:#x} is not aligned.*multiple of 0x8"
    with pytest.raises(AddressError, match=pattern):
        memory.read_u64(address)
    with pytest.raises(AddressError, match=pattern):
        memory.write_u64(address, 0)
    assert list(memory.touched_frames()) == []


@pytest.mark.parametrize("value", [1 << 64, (1 << 64) + 5, 1 << 100, -1, -(1 << 63)])
def test_entry_value_out_of_range_rejected(value: int) -> None:
    memory = PhysicalMemory(46)
    with pytest.raises(TwodwalkError, match=r"entry value=.*out of range.*2\*\*64"):
        memory.write_u64(0x1000, value)
    assert list(memory.touched_frames()) == []


@pytest.mark.parametrize("value", [True, 1.0, "1", None])
def test_entry_value_not_an_integer_rejected(value: object) -> None:
    memory = PhysicalMemory(46)
    with pytest.raises(TwodwalkError, match="entry value must be an integer"):
        memory.write_u64(0x1000, value)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", [1.5, "0x1000", None, True])
def test_address_not_an_integer_rejected(address: object) -> None:
    memory = PhysicalMemory(46)
    with pytest.raises(TwodwalkError, match="physical address must be an integer"):
        memory.read_u64(address)  # type: ignore[arg-type]


@pytest.mark.parametrize("maxphyaddr", [11, 65, -1])
def test_maxphyaddr_out_of_range_rejected(maxphyaddr: int) -> None:
    with pytest.raises(TwodwalkError, match=r"maxphyaddr=.*valid is 12\.\.64"):
        PhysicalMemory(maxphyaddr)


def test_negative_read_size_rejected() -> None:
    memory = PhysicalMemory(46)
    with pytest.raises(TwodwalkError, match="size"):
        memory.read(0x1000, -1)


# --- PhysicalMemory: sparseness, zero_frame, copy_frame ---------------------------------------


def test_touched_frames_lists_only_written_frames_in_order() -> None:
    memory = PhysicalMemory(46)
    memory.write_u64(0x7008, 1)
    memory.write_u64(0x3000, 2)
    memory.write(0x1234_5000, b"\x01")
    memory.read_u64(0x9000)
    assert list(memory.touched_frames()) == [0x3000, 0x7000, 0x1234_5000]


def test_writing_zero_still_touches_the_frame() -> None:
    memory = PhysicalMemory(46)
    memory.write_u64(0x8000, 0)
    assert list(memory.touched_frames()) == [0x8000]
    assert memory.read(0x8000, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_zero_frame_clears_and_drops_it() -> None:
    memory = PhysicalMemory(46)
    memory.write(0x5000, b"\xaa" * PAGE_SIZE)
    memory.write_u64(0x6000, 7)
    memory.zero_frame(0x5000)
    assert memory.read(0x5000, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert list(memory.touched_frames()) == [0x6000]
    assert memory.read_u64(0x6000) == 7
    memory.zero_frame(0x9000)  # a never-written frame: nothing to do
    assert list(memory.touched_frames()) == [0x6000]


def test_zero_frame_rejects_unaligned_and_out_of_range() -> None:
    memory = PhysicalMemory(40)
    with pytest.raises(AddressError, match=r"frame address=0x5008 is not aligned.*0x1000"):
        memory.zero_frame(0x5008)
    with pytest.raises(AddressError, match="MAXPHYADDR=40"):
        memory.zero_frame(1 << 40)


def test_copy_frame_copies_one_whole_frame() -> None:
    memory = PhysicalMemory(46)
    data = bytes((i * 7) & 0xFF for i in range(PAGE_SIZE))
    memory.write(0x3000, data)
    memory.write_u64(0x4000, 0x55)  # the byte after the source frame must not be copied
    memory.write(0x8000, b"\xff" * PAGE_SIZE)
    memory.copy_frame(0x3000, 0x8000)
    assert memory.read(0x8000, PAGE_SIZE) == data
    assert memory.read(0x3000, PAGE_SIZE) == data
    assert memory.read_u64(0x9000) == 0
    memory.copy_frame(0xA000, 0x8000)  # copying a zero frame clears the destination
    assert memory.read(0x8000, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_copy_frame_rejects_unaligned_source_and_destination() -> None:
    memory = PhysicalMemory(46)
    with pytest.raises(AddressError, match=r"source=0x3010 is not aligned"):
        memory.copy_frame(0x3010, 0x8000)
    with pytest.raises(AddressError, match=r"destination=0x8800 is not aligned"):
        memory.copy_frame(0x3000, 0x8800)
    with pytest.raises(AddressError, match="outside physical memory"):
        memory.copy_frame(0x3000, 1 << 46)


# --- FrameAllocator ---------------------------------------------------------------------------


def test_frames_are_aligned_distinct_and_in_range() -> None:
    memory = PhysicalMemory(46)
    allocator = FrameAllocator(memory, 0x10_0000, 0x11_0000)
    frames = [allocator.alloc() for _ in range(16)]
    assert len(set(frames)) == 16
    for frame in frames:
        assert frame % PAGE_SIZE == 0
        assert 0x10_0000 <= frame < 0x11_0000
    assert allocator.allocated == set(frames)
    assert frames[0] == 0x10_0000  # lowest first


def test_allocated_frames_are_zeroed() -> None:
    memory = PhysicalMemory(46)
    memory.write(0x20_0000, b"\xee" * (2 * PAGE_SIZE))  # junk before the allocator exists
    allocator = FrameAllocator(memory, 0x20_0000, 0x20_2000)
    frame = allocator.alloc()
    assert memory.read(frame, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_freed_frame_is_zeroed_when_reallocated() -> None:
    memory = PhysicalMemory(46)
    allocator = FrameAllocator(memory, 0x10_0000, 0x10_4000)
    frame = allocator.alloc()
    memory.write(frame, b"\x5a" * PAGE_SIZE)
    memory.write_u64(frame + 0xFF8, (1 << 64) - 1)
    allocator.free(frame)
    assert frame not in allocator.allocated
    again = allocator.alloc()
    assert again == frame  # freed frames are reused before fresh ones
    assert memory.read(again, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_live_frames_stay_distinct_after_free_and_realloc() -> None:
    memory = PhysicalMemory(46)
    allocator = FrameAllocator(memory, 0x10_0000, 0x10_8000)
    frames = [allocator.alloc() for _ in range(5)]
    allocator.free(frames[1])
    allocator.free(frames[3])
    live = [frames[0], frames[2], frames[4], allocator.alloc(), allocator.alloc()]
    live.append(allocator.alloc())
    assert len(set(live)) == len(live)
    assert allocator.allocated == set(live)


def test_exhaustion_raises_memory_error_with_clear_message() -> None:
    memory = PhysicalMemory(46)
    allocator = FrameAllocator(memory, 0x10_0000, 0x10_3000)
    frames = [allocator.alloc() for _ in range(3)]
    assert frames == [0x10_0000, 0x10_1000, 0x10_2000]
    with pytest.raises(MemoryError, match=r"out of frames: all 3 frames in \[0x100000, 0x103000\)"):
        allocator.alloc()
    allocator.free(frames[1])
    assert allocator.alloc() == frames[1]
    with pytest.raises(MemoryError, match="out of frames"):
        allocator.alloc()


@pytest.mark.parametrize("address", [0x10_0000, 0x10_1000, 0x20_0000, 0x10_0008])
def test_freeing_a_frame_not_allocated_raises(address: int) -> None:
    memory = PhysicalMemory(46)
    allocator = FrameAllocator(memory, 0x10_0000, 0x10_4000)
    if address != 0x10_0000:
        allocator.alloc()  # 0x100000 is allocated; the others are not
    with pytest.raises(TwodwalkError, match=rf"frame {address:#x} was not allocated"):
        allocator.free(address)


def test_double_free_raises() -> None:
    memory = PhysicalMemory(46)
    allocator = FrameAllocator(memory, 0x10_0000, 0x10_4000)
    frame = allocator.alloc()
    allocator.free(frame)
    with pytest.raises(TwodwalkError, match=rf"frame {frame:#x} was not allocated"):
        allocator.free(frame)


def test_allocator_bounds_are_checked() -> None:
    memory = PhysicalMemory(40)
    with pytest.raises(AddressError, match=r"first=0x100800 is not aligned"):
        FrameAllocator(memory, 0x10_0800, 0x20_0000)
    with pytest.raises(AddressError, match=r"limit=0x200800 is not aligned"):
        FrameAllocator(memory, 0x10_0000, 0x20_0800)
    with pytest.raises(AddressError, match=r"limit=0x10000001000 is out of range"):
        FrameAllocator(memory, 0x10_0000, (1 << 40) + PAGE_SIZE)
    with pytest.raises(AddressError, match=r"limit=0x100000 is out of range"):
        FrameAllocator(memory, 0x10_0000, 0x10_0000)
