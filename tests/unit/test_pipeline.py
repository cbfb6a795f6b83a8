from __future__ import annotations

import gevent
import pytest
from flask import Flask

from proxy_app.background import on_gevent
from proxy_app.pipeline import FairShare


def test_only_a_request_that_never_waited_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    fair_share = FairShare()
    yields: list[float] = []
    monkeypatch.setattr(fair_share, "_sleep", yields.append)

    never_waited = fair_share.mark()
    fair_share.settle(never_waited)
    assert yields == [0]

    waited = fair_share.mark()
    gevent.sleep(0.001)  # what waiting for Redis or the upstream does: the event loop turns
    fair_share.settle(waited)
    assert yields == [0]  # no second yield


def test_fair_share_is_off_without_gevent_patching(app: Flask) -> None:
    from proxy_app.pipeline import FAIR_SHARE

    assert not on_gevent()
    assert FAIR_SHARE not in app.extensions
