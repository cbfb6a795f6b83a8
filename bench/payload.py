"""The ~1 KB JSON document every server in the comparison answers with (nginx, the slow upstream,
the Flask hello reference). A module of its own, importing only ``json``, so that the hello app
imports nothing before gunicorn's gevent worker monkey-patches."""

from __future__ import annotations

import json

PAYLOAD = json.dumps(
    {
        "items": [
            {"id": n, "name": f"item-{n}", "price": n * 1.25, "tags": ["a", "b"]} for n in range(14)
        ]
    }
)
