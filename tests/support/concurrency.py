"""Fire calls at once from threads (released together by a barrier) and collect the answers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_parallel(calls: list[Callable[[], T]], timeout_s: float = 60) -> list[T]:
    answers: list[T] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> None:
        barrier.wait(timeout=20)
        answer = call()
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    return answers
