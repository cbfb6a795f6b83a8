"""Client API keys: their format, and the registry in Redis that stores a hash of each key with
its metadata (the raw key is shown once, at creation, and never stored).

Layout under API_KEYS_REDIS_PREFIX (``P``): ``P:key:<keyId>`` a hash with the record,
``P:keys`` the set of key ids (for listing without KEYS), ``P:rate:<keyId>`` the key's
rate-limit state, ``P:admin-failures:<client>`` wrong admin tokens per client and window.
Records carry no TTL, so a ``volatile-*`` eviction policy never drops them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import secrets
import string
from typing import Any

from proxy_app.redis import RedisService

KEY_PREFIX = "pk_"
KEY_ID_LENGTH = 12  # ~71 bits: ids never collide in practice, yet stay short in support tickets
SECRET_BYTES = 32  # 256 bits of entropy in the secret part
_ID_ALPHABET = string.ascii_letters + string.digits
_KEY_SHAPE = re.compile(r"^pk_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{43})$")


def generate_key() -> tuple[str, str]:
    """A new (key id, raw key): ``pk_<id>_<secret>``, recognisable by secret scanners."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def key_id_of(raw_key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    match = _KEY_SHAPE.match(raw_key)
    return match.group(1) if match else None


def hash_key(raw_key: str) -> str:
    # A fast hash is enough: the secret has 256 bits of entropy, nothing to brute-force.
    return hashlib.sha256(raw_key.encode()).hexdigest()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    owner: str
    label: str | None
    contact: str | None
    created_at: str
    created_by: str | None
    expires_at: str | None
    revoked: bool
    revoked_at: str | None

    def to_json(self) -> dict[str, Any]:
        """The record as the admin API shows it: metadata only, never the hash."""
        return {
            "keyId": self.key_id,
            "owner": self.owner,
            "label": self.label,
            "contact": self.contact,
            "createdAt": self.created_at,
            "createdBy": self.created_by,
            "expiresAt": self.expires_at,
            "revoked": self.revoked,
            "revokedAt": self.revoked_at,
        }

    @classmethod
    def from_redis(cls, fields: dict[bytes, bytes]) -> KeyRecord:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(
            key_id=text["keyId"],
            owner=text.get("owner", ""),
            label=text.get("label") or None,
            contact=text.get("contact") or None,
            created_at=text.get("createdAt", ""),
            created_by=text.get("createdBy") or None,
            expires_at=text.get("expiresAt") or None,
            revoked=text.get("revoked") == "1",
            revoked_at=text.get("revokedAt") or None,
        )


class KeyNamespace:
    """Redis key names under API_KEYS_REDIS_PREFIX; the one place that builds them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def record(self, key_id: str) -> str:
        return f"{self.prefix}:key:{key_id}"

    def rate(self, key_id: str) -> str:
        return f"{self.prefix}:rate:{key_id}"

    @property
    def all_ids(self) -> str:
        return f"{self.prefix}:keys"

    def admin_failures(self, client: str) -> str:
        return f"{self.prefix}:admin-failures:{client}"


class KeyRegistry:
    """Create, list, revoke, activate and delete keys. Raises RedisUnavailable when Redis is."""

    def __init__(self, redis: RedisService, prefix: str) -> None:
        self.redis = redis
        self.names = KeyNamespace(prefix)
        self._update = redis.script(__file__, "key_update.lua")

    def create(
        self,
        *,
        owner: str,
        label: str | None = None,
        contact: str | None = None,
        expires_at: dt.datetime | None = None,
        created_by: str | None = None,
    ) -> tuple[KeyRecord, str]:
        """Store a new key; returns its record and the raw key (to be shown once)."""
        key_id, raw_key = generate_key()
        record = KeyRecord(
            key_id=key_id,
            owner=owner,
            label=label,
            contact=contact,
            created_at=iso(utc_now()) or "",
            created_by=created_by,
            expires_at=iso(expires_at),
            revoked=False,
            revoked_at=None,
        )
        fields = {
            "keyId": key_id,
            "hash": hash_key(raw_key),
            "owner": owner,
            "label": label or "",
            "contact": contact or "",
            "createdAt": record.created_at,
            "createdBy": created_by or "",
            "expiresAt": record.expires_at or "",
            "expiresAtMs": str(int(expires_at.timestamp() * 1000)) if expires_at else "",
            "revoked": "0",
            "revokedAt": "",
        }
        self.redis.transaction(
            (
                "HSET",
                self.names.record(key_id),
                *(item for pair in fields.items() for item in pair),
            ),
            ("SADD", self.names.all_ids, key_id),
        )
        return record, raw_key

    def get(self, key_id: str) -> KeyRecord | None:
        fields = self.redis.hgetall(self.names.record(key_id))
        return KeyRecord.from_redis(fields) if fields else None

    def list(self) -> list[KeyRecord]:
        key_ids = self.redis.set_members(self.names.all_ids, batch=500)
        found = self.redis.hgetall_many([self.names.record(key_id.decode()) for key_id in key_ids])
        records = [KeyRecord.from_redis(fields) for fields in found if fields]
        return sorted(records, key=lambda record: (record.created_at, record.key_id))

    def revoke(self, key_id: str) -> bool:
        return self._set_fields(key_id, revoked="1", revokedAt=iso(utc_now()) or "")

    def activate(self, key_id: str) -> bool:
        return self._set_fields(key_id, revoked="0", revokedAt="")

    def delete(self, key_id: str) -> bool:
        removed = self.redis.transaction(
            ("DEL", self.names.record(key_id)),
            ("SREM", self.names.all_ids, key_id),
            ("DEL", self.names.rate(key_id)),
        )
        return bool(removed[0])

    def count_admin_failure(self, client: str, window_s: int) -> int:
        """One more wrong admin token from ``client`` in the current window; the count."""
        return self.redis.incr_with_ttl(self.names.admin_failures(client), window_s)

    def _set_fields(self, key_id: str, **fields: str) -> bool:
        args = [item for pair in fields.items() for item in pair]
        return bool(self.redis.run_script(self._update, [self.names.record(key_id)], args))
