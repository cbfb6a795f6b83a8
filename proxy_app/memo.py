"""Bounded memory for pure functions of strings that clients send again and again."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def remembered(*, most: int, longest: int) -> Callable[[Callable[[str], T]], Callable[[str], T]]:
    """Remember ``func``'s answers for arguments of at most ``longest`` characters, the ``most``
    recent ones; longer arguments are worked out every time, so the memory stays bounded."""

    def decorate(func: Callable[[str], T]) -> Callable[[str], T]:
        cached = functools.lru_cache(maxsize=most)(func)

        @functools.wraps(func)
        def call(argument: str) -> T:
            return cached(argument) if len(argument) <= longest else func(argument)

        return call

    return decorate
