"""The base of memguard's closed sets of names: ``str`` enums whose ``str()`` is their value."""

from __future__ import annotations

import enum

__all__ = ["StrEnum"]


class StrEnum(str, enum.Enum):
    """A ``str`` enum that reads as its value: ``str(member) == member.value``, as Python 3.11's
    ``enum.StrEnum`` does (memguard supports 3.10). A member compares and hashes as its value."""

    def __str__(self) -> str:
        return self.value
