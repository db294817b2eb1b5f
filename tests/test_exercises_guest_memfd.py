"""The guest-memfd exercises: the answer for each story worked out from guest_memfd.c and
kvm_main.c (Linux 6.18), and what a wrong answer is told."""

from __future__ import annotations

import pytest
from exercise_support import right, wrong

from twodwalk.errors import TwodwalkError
from twodwalk.exercises import GUEST_MEMFD_STORIES, guest_memfd_question, quiz

EXPECTED = {
    "size-zero": "EINVAL",  # kvm_gmem_create: size <= 0
    "size-unaligned": "EINVAL",  # !PAGE_ALIGNED(size)
    "bind": "success",
    "offset-unaligned": "EINVAL",  # kvm_set_memory_region: guest_memfd_offset & ~PAGE_MASK
    "past-the-end": "EINVAL",  # kvm_gmem_bind: offset + size > i_size
    "bound-twice": "EINVAL",  # kvm_gmem_bind: xa_find in the bindings
    "bad-descriptor": "EBADF",  # kvm_gmem_bind: fget fails
    "overlaps-ram": "EEXIST",  # kvm_check_memslot_overlap, before the bind
    "readonly": "EINVAL",  # check_memory_region_flags
    "legacy-ioctl": "EINVAL",  # KVM_SET_USER_MEMORY_REGION_V1_FLAGS
    "change": "EINVAL",  # private memslots are immutable
    "delete-rebind": "success",  # kvm_gmem_unbind freed the range
    "punch": "success",
    "punch-no-keep-size": "EOPNOTSUPP",  # kvm_gmem_fallocate
    "mmap-private": "success",  # mmap works; touching a page is what is SIGBUS
    "mmap-shared": "success",
    "mmap-no-flag": "ENODEV",  # kvm_gmem_mmap
}


def test_every_story_has_a_hand_checked_answer() -> None:
    assert set(EXPECTED) == set(GUEST_MEMFD_STORIES)


@pytest.mark.parametrize(("story", "answer"), sorted(EXPECTED.items()))
def test_story_answers(story: str, answer: str) -> None:
    q = guest_memfd_question(story)
    assert q.answer == answer
    right(q, answer.lower())
    if answer != "success":
        assert wrong(q, "success").startswith("Not success: the rule: ")
    else:
        assert wrong(q, "EINVAL") == "Not EINVAL: every rule allows this call."


def test_notations_and_bad_input() -> None:
    q = guest_memfd_question("punch-no-keep-size")
    for answer in ("EOPNOTSUPP", "-EOPNOTSUPP", "enotsup"):
        right(q, answer)
    assert "Cannot read" in wrong(q, "maybe")
    with pytest.raises(TwodwalkError, match="story='x' is not valid"):
        guest_memfd_question("x")
    assert quiz(3, "guest-memfd").topic == "guest-memfd"
