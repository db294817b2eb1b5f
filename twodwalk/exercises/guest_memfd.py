"""Topic 'guest-memfd': what the last of a few guest_memfd calls returns (Linux 6.18
virt/kvm/guest_memfd.c, kvm_main.c). The engine runs the calls on a fresh VM; the answer is
"success" or the errno, and a wrong answer is told which rule decided."""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from types import MappingProxyType

from twodwalk.engine.kvm.guest_memfd import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
)
from twodwalk.engine.kvm.memslots import KVM_MEM_GUEST_MEMFD, KVM_MEM_READONLY, KvmError
from twodwalk.engine.machine import Machine
from twodwalk.errors import check_aligned, check_choice, check_int
from twodwalk.exercises.grading import Grader, Question, Value, _mistakes, _normal, seeded_rng

MIB = 1 << 20
_GPA = 1 << 30
_HVA = 0x7E00_0000_0000
Step = tuple[str, Callable[[Machine], object]]


def _create(size: int, flags: int = 0) -> Step:
    names = [n for bit, n in ((1, "MMAP"), (2, "INIT_SHARED")) if flags & bit]
    shown = " | ".join(f"GUEST_MEMFD_FLAG_{n}" for n in names) or "0"
    return (
        f"fd = KVM_CREATE_GUEST_MEMFD(size={size:#x}, flags={shown})",
        lambda m: m.vm.create_guest_memfd(size, flags),
    )


def _bind(
    slot: int,
    gpa: int,
    size: int,
    offset: int,
    flags: int = KVM_MEM_GUEST_MEMFD,
    fd: int | None = None,
) -> Step:
    """A binding to the story's file, or to descriptor `fd`."""
    shown = "KVM_MEM_GUEST_MEMFD" + (" | KVM_MEM_READONLY" if flags & KVM_MEM_READONLY else "")
    return (
        f"KVM_SET_USER_MEMORY_REGION2(slot={slot}, flags={shown}, guest_phys_addr={gpa:#x},"
        f" memory_size={size:#x}, guest_memfd={'fd' if fd is None else fd},"
        f" guest_memfd_offset={offset:#x})",
        lambda m: m.vm.set_user_memory_region2(
            slot, flags, gpa, size, _HVA, _fd(m) if fd is None else fd, offset
        ),
    )


def _legacy(slot: int, gpa: int) -> Step:
    return (
        f"KVM_SET_USER_MEMORY_REGION(slot={slot}, flags=KVM_MEM_GUEST_MEMFD,"
        f" guest_phys_addr={gpa:#x}, memory_size={MIB:#x})  (the old ioctl)",
        lambda m: m.vm.set_user_memory_region(slot, KVM_MEM_GUEST_MEMFD, gpa, MIB, _HVA),
    )


def _delete(slot: int) -> Step:
    return (
        f"KVM_SET_USER_MEMORY_REGION2(slot={slot}, memory_size=0)  (delete)",
        lambda m: m.vm.set_user_memory_region2(slot, 0, 0, 0, _HVA),
    )


def _fallocate(mode: int, offset: int, length: int) -> Step:
    names = [n for bit, n in ((1, "KEEP_SIZE"), (2, "PUNCH_HOLE")) if mode & bit]
    shown = " | ".join(f"FALLOC_FL_{n}" for n in names)
    return (
        f"fallocate(fd, {shown}, offset={offset:#x}, len={length:#x})",
        lambda m: m.vm.guest_memfd(_fd(m)).fallocate(mode, offset, length),
    )


def _mmap() -> Step:
    return (
        "mmap(fd, MAP_SHARED) in the VMM",
        lambda m: m.vm.guest_memfd(_fd(m)).mmap(m.vmm, MIB),
    )


def _fd(machine: Machine) -> int:
    """`fd` in the story: the descriptor the VMM opened last."""
    return max(machine.vmm.files)


def _stories(slot: int, gpa: int) -> dict[str, tuple[Step, ...]]:
    """Each story's calls, with the guest_memfd slot numbered `slot` at GPA `gpa`."""
    good = _create(2 * MIB, GUEST_MEMFD_FLAG_MMAP)
    shared = _create(2 * MIB, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    bind = _bind(slot, gpa, MIB, 0)
    punch = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    return {
        "size-zero": (_create(0),),
        "size-unaligned": (_create(MIB + 0x800),),
        "bind": (good, _bind(slot, gpa, MIB, MIB)),
        "offset-unaligned": (good, _bind(slot, gpa, MIB, 0x800)),
        "past-the-end": (good, _bind(slot, gpa, MIB, 2 * MIB - 0x4000)),
        "bound-twice": (good, bind, _bind(slot + 1, gpa + MIB, MIB, MIB // 2)),
        "bad-descriptor": (good, _bind(slot, gpa, MIB, 0, fd=99)),
        "overlaps-ram": (good, _bind(slot, 0x10_0000, MIB, 0)),
        "readonly": (good, _bind(slot, gpa, MIB, 0, KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY)),
        "legacy-ioctl": (good, _legacy(slot, gpa)),
        "change": (good, bind, bind),
        "delete-rebind": (good, bind, _delete(slot), _bind(slot + 1, gpa, MIB, 0)),
        "punch": (good, _fallocate(punch, 0, 0x4000)),
        "punch-no-keep-size": (good, _fallocate(FALLOC_FL_PUNCH_HOLE, 0, 0x4000)),
        "mmap-private": (good, _mmap()),
        "mmap-shared": (shared, _mmap()),
        "mmap-no-flag": (_create(2 * MIB), _mmap()),
    }


STORIES: Mapping[str, tuple[Step, ...]] = MappingProxyType(_stories(1, _GPA))
_WORDS = {"success": "success", "ok": "success", "0": "success", "succeeds": "success"}
_ERRNOS = ("EINVAL", "EBADF", "EEXIST", "EOPNOTSUPP", "ENODEV")


def _read(text: str) -> tuple[Value, ...]:
    word = _normal(text).removeprefix("-").upper()
    if _normal(text) in _WORDS:
        return ("success",)
    aliases = {"ENOTSUP": "EOPNOTSUPP"}
    word = aliases.get(word, word)
    return (word,) if word in _ERRNOS else ()


def _errno_name(code: int) -> str:
    """Linux names errno 95 ENOTSUP and EOPNOTSUPP alike; fallocate's man page says the
    latter."""
    return "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]


def guest_memfd_question(story: str, *, slot: int = 1, gpa: int = _GPA) -> Question:
    """What the last call of `story` (a key of `STORIES`) returns on a fresh VM of x86's
    default type, with the earlier calls made first; the guest_memfd slot is `slot` at
    `gpa`."""
    check_int("slot", slot, 1, 100, valid="1..99 (slot 0 is guest RAM)")
    check_aligned("gpa", check_int("gpa", gpa, 16 * MIB, 1 << 40, valid="16 MiB .. 1 TiB"), MIB)
    steps = _stories(slot, gpa)[check_choice("story", story, tuple(STORIES))]
    machine = Machine(guest_ram=8 * MIB)
    earlier = []
    for text, call in steps[:-1]:
        done = call(machine)
        earlier.append(f"  {text}: " + (f"fd = {done}" if isinstance(done, int) else "success"))
    try:
        steps[-1][1](machine)
        expected: Value = "success"
        why = "every rule allows it"
    except KvmError as failure:
        expected = _errno_name(failure.errno)
        why = str(failure).split(": ", 1)[1]
    listed = "\n".join(f"  {n}. {text}" for n, (text, _) in enumerate(steps, 1))
    prompt = (
        "On a fresh KVM VM (x86's default VM type, Linux 6.18) whose guest RAM is memslot 0 at"
        " GPA 0 (8 MiB), the VMM makes these calls in order; the earlier ones do what they"
        f" do.\n{listed}\n"
        f"What does call {len(steps)} return? Answer 'success' or the errno (EINVAL, EBADF,"
        " EEXIST, EOPNOTSUPP, ENODEV)."
    )
    hint = (
        "KVM_CREATE_GUEST_MEMFD wants a positive, page-aligned size and known flags. A"
        " guest_memfd slot takes no other flag, only through KVM_SET_USER_MEMORY_REGION2, at a"
        " page-aligned offset inside the file, on file pages no other slot holds, and it cannot"
        " be changed, only deleted. fallocate needs FALLOC_FL_KEEP_SIZE; mmap needs"
        " GUEST_MEMFD_FLAG_MMAP."
    )
    solution = "\n".join(
        [
            "On the engine's VM, call by call:",
            *earlier,
            f"  {steps[-1][0]}: {expected} ({why})",
            f"Answer: {expected}",
        ]
    )
    decides = "every rule allows this call" if expected == "success" else f"the rule: {why}"
    mistakes = [(other, f"Not {other}: {decides}.") for other in ("success", *_ERRNOS)]
    grader = Grader(
        expected,
        _read,
        "give 'success' or an errno name such as EINVAL",
        _mistakes(expected, mistakes),
        lambda given: f"Not {given}.",
    )
    return Question("guest-memfd", prompt, hint, solution, str(expected), grader)


def _seeded_guest_memfd(seed: int) -> Question:
    rng = seeded_rng("guest-memfd", seed)
    story = rng.choice(tuple(STORIES))
    return guest_memfd_question(story, slot=rng.randint(1, 9), gpa=rng.randint(16, 1024) * MIB)
