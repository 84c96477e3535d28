"""One small registry type for things registered by name: crawl engines, hash kinds, architectures."""
from __future__ import annotations

import difflib
import threading
from typing import Callable, Generic, Iterator, Mapping, TypeVar

from fastclass.errors import FastclassError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Register by name, list, look up with a did-you-mean error. `load`, when given, registers the
    built-in entries on first use, so importing the module that holds the registry stays cheap."""

    def __init__(self, kind: str, load: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._load = load
        self._lock = threading.Lock()

    def register(self, name: str, item: T) -> T:
        self._items[name] = item
        return item

    def lookup(self, name: str, also: str = "") -> T:
        """The entry called name, or a FastclassError that names the closest entry and lists them all
        (`also` is added after the list, e.g. what else is accepted)."""
        items = self._entries()
        if name in items:
            return items[name]
        close = difflib.get_close_matches(name, list(items), n=1)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        raise FastclassError(f"unknown {self.kind} {name!r}{maybe}; use one of: {', '.join(sorted(items))}{also}")

    def _entries(self) -> dict[str, T]:
        if self._load is not None:
            # Threads (a worker's concurrent jobs) may ask at once: one loads, the others wait for it.
            with self._lock:
                if self._load is not None:
                    self._load()
                    self._load = None
        return self._items

    def __getitem__(self, name: str) -> T:
        return self._entries()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())
