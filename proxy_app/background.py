"""A bounded pool for work that must not hold up a response (stale-while-revalidate refreshes).

Under gunicorn's gevent workers the pool is a gevent Pool; in a plain process (tests, tools) it
is a small thread pool. Either way a full pool refuses new work instead of queueing it.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

# Set while background work runs: what it does must never make a client wait (a request to
# the upstream it cannot start at once is skipped, not queued).
_IN_BACKGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "proxy_app_in_background", default=False
)


def in_background() -> bool:
    """Whether the caller runs as work started by a background spawner."""
    return _IN_BACKGROUND.get()


def _as_background(work: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        token = _IN_BACKGROUND.set(True)
        try:
            work()
        finally:
            _IN_BACKGROUND.reset(token)

    return run


def on_gevent() -> bool:
    """Whether this process runs on gevent (a gunicorn gevent worker patches before the app is
    built); tests and tools run on plain threads."""
    import gevent.monkey

    return bool(gevent.monkey.is_module_patched("socket"))


def background_spawner(size: int) -> Callable[[Callable[[], None]], bool]:
    """A function that starts ``work`` in the background and says whether it did."""
    if on_gevent():
        import gevent.pool

        pool = gevent.pool.Pool(size)

        def spawn_greenlet(work: Callable[[], None]) -> bool:
            if pool.full():
                return False
            pool.spawn(_as_background(work))
            return True

        return spawn_greenlet

    executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="proxy-app-refresh")
    slots = threading.BoundedSemaphore(size)

    def spawn_thread(work: Callable[[], None]) -> bool:
        if not slots.acquire(blocking=False):
            return False

        def run() -> None:
            try:
                _as_background(work)()
            finally:
                slots.release()

        executor.submit(run)
        return True

    return spawn_thread
