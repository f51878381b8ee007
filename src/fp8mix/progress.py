"""The progress callback that long loops take: ``progress(items, description)`` yields the items.

The CLI passes a rich progress bar; library callers and tests pass nothing and get ``no_progress``. It lives
here, outside every stage, so that score, export and quant can all accept one without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

Progress = Callable[[Iterable, str], Iterable]


def no_progress(items: Iterable, _description: str) -> Iterable:
    return items


__all__ = ["Progress", "no_progress"]
