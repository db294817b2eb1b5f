"""Errors for bad input: each names the field, the bad value and what would be valid.

The engine reports *architectural* events (page faults, EPT violations, exits) as values in walk
records and traces; these exceptions are only for calls that make no sense, so that a learner
gets one clear sentence instead of a traceback from deep inside the engine.
"""

from __future__ import annotations


class TwodwalkError(ValueError):
    """Base class of every input error raised by twodwalk."""


class AddressError(TwodwalkError):
    """An address outside what the hardware or the simulated memory can hold."""


def check_int(field: str, value: object, low: int, high: int, *, valid: str = "") -> int:
    """Return `value` if it is an int in [low, high); raise naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TwodwalkError(f"{field} must be an integer, got {value!r} ({type(value).__name__})")
    if not low <= value < high:
        what = valid or f"{low:#x} <= {field} < {high:#x}"
        raise AddressError(f"{field}={value:#x} is out of range: valid is {what}")
    return value


def check_aligned(field: str, value: int, alignment: int) -> int:
    """Return `value` if it is a multiple of `alignment`; raise naming the field otherwise."""
    if value % alignment:
        raise AddressError(
            f"{field}={value:#x} is not aligned: it must be a multiple of {alignment:#x}"
            f" (low {alignment.bit_length() - 1} bits clear)"
        )
    return value


def check_choice(field: str, value: object, choices: tuple[str, ...]) -> str:
    """Return `value` if it is one of `choices`; raise listing the valid ones otherwise."""
    if value not in choices:
        raise TwodwalkError(f"{field}={value!r} is not valid: choose one of {', '.join(choices)}")
    return str(value)


def parse_int(text: str, field: str = "address") -> int:
    """An address or size as people write them in paging dumps: hex with or without 0x
    (0x7f001000, 7f001000), or decimal with NASM's 0d prefix (0d4096); underscores allowed."""
    digits = text.strip().lower().replace("_", "")
    base, body = (10, digits[2:]) if digits.startswith("0d") else (16, digits.removeprefix("0x"))
    if body and all(c in "0123456789abcdef"[:base] for c in body):
        return int(body, base)
    raise TwodwalkError(
        f"{field} = {text!r} is not a number: give hex (0x7f001000 or 7f001000)"
        " or decimal with 0d (0d4096)"
    )
