"""Dirty pages: which 4 KiB metadata pages changed since the last commit, handed over to a commit whole.

The BAT and the sector bitmaps each keep a ``DirtySet``. A flush takes a ``PageBatch`` of all of them at
one instant (the pages then describe exactly the writes made before that instant); if the commit fails
(ENOSPC, EIO), ``restore`` marks the same pages dirty again, so the next flush journals them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


class DirtySet(Generic[K]):
    """Keys of changed pages (page numbers of the BAT, (chunk, page) of the sector bitmaps)."""

    def __init__(self) -> None:
        self._keys: set[K] = set()

    def add(self, key: K) -> None:
        self._keys.add(key)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def take(self) -> set[K]:
        """Hand every key over and start empty."""
        keys, self._keys = self._keys, set()
        return keys

    def restore(self, keys: Iterable[K]) -> None:
        self._keys.update(keys)


class PageSource(Protocol):
    """Something whose changed pages are journaled: the BAT, the sector bitmaps."""

    @property
    def dirty(self) -> DirtySet[Any]: ...

    def pages_for(self, keys: set[Any], /) -> dict[int, bytes]: ...


class PageBatch:
    """The dirty pages of several sources, taken at one instant: file offset -> 4 KiB page."""

    def __init__(self, sources: Iterable[PageSource]) -> None:
        self._taken = [(source, source.dirty.take()) for source in sources]
        self.pages: dict[int, bytes] = {}
        for source, keys in self._taken:
            if keys:
                self.pages.update(source.pages_for(keys))

    def restore(self) -> None:
        """The commit failed: the pages are dirty again."""
        for source, keys in self._taken:
            source.dirty.restore(keys)
