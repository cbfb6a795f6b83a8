"""The Flask class the gateway runs on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask


class GatewayFlask(Flask):
    """Flask, remembering which view functions and hooks are plain functions: Flask asks for
    every hook and view of every request, and the answer never changes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return self._sync[func]
        except KeyError:
            wrapped = self._sync[func] = super().ensure_sync(func)
            return wrapped
        except TypeError:  # not hashable
            return super().ensure_sync(func)
