"""Splitting one study across machines: ``--shard I/N`` picks a deterministic 1/N of the images.

An image belongs to shard ``sha1(relative path) mod N + 1``, computed on the path's bytes (as the file system
holds them: UTF-8, or the original bytes of a name that is not valid UTF-8). The assignment depends on nothing
but the relative path and N: not on the machine, the Python version (``hash()`` is salted per process; SHA-1 is
not), the order of a folder listing or the other files. So N jobs of a job array, on N machines or GPUs, split a
study without talking to each other, and a file added later does not move any other file to another shard.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import UsageError

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")

T = TypeVar("T")


def shard_of(rel: str, count: int) -> int:
    """The shard (1..count) that the image at relative POSIX path ``rel`` belongs to."""
    # Explicit UTF-8 + surrogateescape, not os.fsencode: the same bytes whatever the machine's locale.
    digest = hashlib.sha1(rel.encode("utf-8", errors="surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based: ``1/4`` .. ``4/4``, as a job array's task ids run ``--array=1-4``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise UsageError(f"--shard {self.index}/{self.count}: need 1 <= I <= N (for example 1/4 .. 4/4)")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"2/8"`` -> Shard(2, 8); UsageError with the expected form otherwise."""
        match = _SPEC.match(text or "")
        if not match:
            raise UsageError(f"--shard {text!r}: expected I/N, for example 2/8 (shard 2 of 8)")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def contains(self, rel: str) -> bool:
        return shard_of(rel, self.count) == self.index

    def select(self, items: Iterable[T], key: Callable[[T], str] = lambda item: item.rel) -> list[T]:
        """The items of this shard, in their original order."""
        return [item for item in items if self.contains(key(item))]


def missing_shards(present: Sequence[Shard]) -> list[int]:
    """Indices of 1..N not among ``present`` (all of the same N)."""
    if not present:
        return []
    have = {s.index for s in present}
    return [i for i in range(1, present[0].count + 1) if i not in have]
