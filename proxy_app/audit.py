"""The audit trail of admin actions: who did what, to which key, with what outcome. Never a
raw key or token (the log formatter redacts them too, should one slip through)."""

from __future__ import annotations

import logging

from flask import request

log = logging.getLogger("proxy_app.audit")

ACTOR_HEADER = "x-admin-actor"


def audit(action: str, outcome: str, **details: object) -> None:
    log.info(
        "admin action",
        extra={
            "action": action,
            "outcome": outcome,
            "actor": request.headers.get(ACTOR_HEADER, "")[:100] or None,
            "client_ip": request.remote_addr,
            **{key: value for key, value in details.items() if value is not None},
        },
    )
