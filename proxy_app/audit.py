"""The audit trail of admin actions: who did what, to which key, with what outcome. Never a
raw key or token (the log formatter redacts them too, should one slip through)."""

from __future__ import annotations

import logging

from flask import request

from proxy_app import headers

log = logging.getLogger("proxy_app.audit")


def audit(action: str, outcome: str, **details: object) -> None:
    log.info(
        "admin action",
        extra={
            "action": action,
            "outcome": outcome,
            "actor": request.headers.get(headers.ADMIN_ACTOR, "")[:100] or None,
            "client_ip": request.remote_addr,
            **{key: value for key, value in details.items() if value is not None},
        },
    )
