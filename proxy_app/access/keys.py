"""Client API keys: their format, and the registry in Redis that stores a hash of each key with
its metadata (the raw key is shown once, at creation, and never stored).

Layout under API_KEYS_REDIS_PREFIX (``P``): ``P:key:<keyId>`` a hash with the record,
``P:keys`` the set of key ids (for listing without KEYS), ``P:plan:<name>`` a plan,
``P:plans`` the set of plan names, ``P:plan-keys:<name>`` the ids of the keys on a plan,
``P:rate:<subject>:<max>:<windowMs>`` the state of one limit and ``P:quota:<subject>:<period>``
a quota's count (the subject is the key id, or ``owner:<owner>`` on a plan shared by owner).
``P:admin-failures:<client>`` counts wrong admin tokens per client and window. Records and
plans carry no TTL, so a ``volatile-*`` eviction policy never drops them; limit and quota
state expire by themselves.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import re
import secrets
import string
from collections.abc import Sequence
from typing import Any

from proxy_app.access.addresses import network_form
from proxy_app.access.plans import (
    DEFAULT_PLAN,
    Limit,
    Quota,
    decode_limits,
    decode_quota,
    encode_limits,
    encode_quota,
)
from proxy_app.redis import RedisService, RedisUnavailable, field_args

log = logging.getLogger(__name__)

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
class Scopes:
    methods: tuple[str, ...] = ()  # empty: every method
    path_prefixes: tuple[str, ...] = ()  # empty: every path

    def to_json(self) -> dict[str, list[str]]:
        return {"methods": list(self.methods), "pathPrefixes": list(self.path_prefixes)}


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
    plan: str | None = None
    limits: tuple[Limit, ...] | None = None  # the key's own, over its plan's
    quota: Quota | None = None  # the key's own, over its plan's
    metadata: dict[str, Any] | None = None
    scopes: Scopes | None = None
    allowed_ips: tuple[str, ...] = ()
    last_used_at: str | None = None
    rolled_to: str | None = None
    rolled_from: str | None = None
    expires_at_ms: int | None = None

    def status(self, now_ms: int) -> str:
        if self.revoked:
            return "revoked"
        if self.expires_at_ms is not None and now_ms >= self.expires_at_ms:
            return "expired"
        return "active"

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
            "status": self.status(int(utc_now().timestamp() * 1000)),
            "plan": self.plan or DEFAULT_PLAN,
            "limits": [limit.to_json() for limit in self.limits] if self.limits else None,
            "quota": self.quota.to_json() if self.quota else None,
            "metadata": self.metadata,
            "scopes": self.scopes.to_json() if self.scopes else None,
            "allowedIps": list(self.allowed_ips) or None,
            "lastUsedAt": self.last_used_at,
            "rolledTo": self.rolled_to,
            "rolledFrom": self.rolled_from,
        }

    @classmethod
    def from_redis(cls, fields: dict[bytes, bytes]) -> KeyRecord:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        methods = tuple(m for m in text.get("scopeMethods", "").split(",") if m)
        prefixes = tuple(p for p in text.get("scopePrefixes", "").split("\n") if p)
        last_used = text.get("lastUsedAtMs")
        expires_ms = text.get("expiresAtMs")
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
            plan=text.get("plan") or None,
            limits=decode_limits(text["limits"]) if text.get("limits") else None,
            quota=decode_quota(text.get("quota", "")),
            metadata=json.loads(text["metadata"]) if text.get("metadata") else None,
            scopes=Scopes(methods, prefixes) if methods or prefixes else None,
            allowed_ips=tuple(n for n in text.get("allowedIps", "").split(",") if n),
            last_used_at=iso_ms(int(last_used)) if last_used else None,
            rolled_to=text.get("rolledTo") or None,
            rolled_from=text.get("rolledFrom") or None,
            expires_at_ms=int(expires_ms) if expires_ms else None,
        )


def iso_ms(milliseconds: int) -> str | None:
    return iso(dt.datetime.fromtimestamp(milliseconds / 1000, dt.UTC))


# A field left out of a change keeps its value; these mark "clear it".
UNSET: Any = object()


def record_fields(**changes: Any) -> dict[str, str]:
    """The Redis fields of the given record values (None clears a field)."""
    fields: dict[str, str] = {}
    for name, value in changes.items():
        if name == "expires_at":
            fields["expiresAt"] = iso(value) or ""
            fields["expiresAtMs"] = str(int(value.timestamp() * 1000)) if value else ""
        elif name == "limits":
            fields["limits"] = encode_limits(tuple(value)) if value else ""
        elif name == "quota":
            fields["quota"] = encode_quota(value)
        elif name == "metadata":
            fields["metadata"] = json.dumps(value, separators=(",", ":")) if value else ""
        elif name == "scopes":
            scopes = value or Scopes()
            fields["scopeMethods"] = f",{','.join(scopes.methods)}," if scopes.methods else ""
            fields["scopePrefixes"] = "\n".join(scopes.path_prefixes)
        elif name == "allowed_ips":
            fields["allowedIps"] = ",".join(value or ())
            fields["allowedNets"] = ",".join(network_form(n) for n in value or ())
        elif name in ("label", "contact", "created_by", "plan", "rolled_to", "rolled_from"):
            fields[_CAMEL[name]] = value or ""
        else:
            raise TypeError(f"not a key record field: {name}")
    return fields


_CAMEL = {
    "label": "label",
    "contact": "contact",
    "created_by": "createdBy",
    "plan": "plan",
    "rolled_to": "rolledTo",
    "rolled_from": "rolledFrom",
}


class KeyNamespace:
    """Redis key names under API_KEYS_REDIS_PREFIX; the one place that builds them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def record(self, key_id: str) -> str:
        return f"{self.prefix}:key:{key_id}"

    @property
    def all_ids(self) -> str:
        return f"{self.prefix}:keys"

    @property
    def events(self) -> str:
        """The channel where changes of keys are announced (grace mode listens)."""
        return f"{self.prefix}:key-events"

    def plan_keys(self, plan: str) -> str:
        return f"{self.prefix}:plan-keys:{plan}"

    def admin_failures(self, client: str) -> str:
        return f"{self.prefix}:admin-failures:{client}"


class NoSuchPlan(Exception):
    """A key was to be put on a plan that does not exist."""


@dataclasses.dataclass(frozen=True, slots=True)
class KeyPage:
    items: list[KeyRecord]
    next_cursor: str | None


class KeyRegistry:
    """Create, change, roll, list, revoke, activate and delete keys. Raises RedisUnavailable
    when Redis is unavailable and NoSuchPlan for a plan that does not exist."""

    def __init__(self, redis: RedisService, prefix: str) -> None:
        self.redis = redis
        self.names = KeyNamespace(prefix)
        self.prefix = prefix
        self._update = redis.script(__file__, "key_update.lua")
        self._save = redis.script(__file__, "key_save.lua")

    def create(
        self,
        *,
        owner: str,
        label: str | None = None,
        contact: str | None = None,
        expires_at: dt.datetime | None = None,
        created_by: str | None = None,
        plan: str | None = None,
        limits: Sequence[Limit] | None = None,
        quota: Quota | None = None,
        metadata: dict[str, Any] | None = None,
        scopes: Scopes | None = None,
        allowed_ips: Sequence[str] | None = None,
        rolled_from: str | None = None,
    ) -> tuple[KeyRecord, str]:
        """Store a new key; returns its record and the raw key (to be shown once)."""
        key_id, raw_key = generate_key()
        fields = {
            "keyId": key_id,
            "hash": hash_key(raw_key),
            "owner": owner,
            "createdAt": iso(utc_now()) or "",
            "revoked": "0",
            "revokedAt": "",
            **record_fields(
                label=label,
                contact=contact,
                created_by=created_by,
                expires_at=expires_at,
                plan=plan,
                limits=limits,
                quota=quota,
                metadata=metadata,
                scopes=scopes,
                allowed_ips=allowed_ips,
                rolled_from=rolled_from,
            ),
        }
        self._store(key_id, "create", plan or DEFAULT_PLAN, fields)
        record = KeyRecord.from_redis({k.encode(): v.encode() for k, v in fields.items()})
        return record, raw_key

    def update(self, key_id: str, **changes: Any) -> KeyRecord | None:
        """Change the given fields (``record_fields`` names; None clears); None when the key
        does not exist."""
        plan = changes.get("plan", UNSET)
        plan_arg = "" if plan is UNSET else (plan or DEFAULT_PLAN)
        fields = record_fields(**{k: v for k, v in changes.items() if v is not UNSET})
        if not self._store(key_id, "update", plan_arg, fields):
            return None
        self._announce("changed", key_id)
        return self.get(key_id)

    def roll(self, key_id: str, grace_s: int) -> tuple[KeyRecord, KeyRecord, str] | None:
        """A new key in the old one's place (same owner, plan, limits, quota, metadata, scopes
        and addresses); the old one keeps working for ``grace_s``, then expires. Returns the
        old record, the new one and the new raw key; None when there is no such key."""
        old = self.get(key_id)
        if old is None:
            return None
        expires = (
            dt.datetime.fromtimestamp(old.expires_at_ms / 1000, dt.UTC)
            if (old.expires_at_ms)
            else None
        )
        record, raw_key = self.create(
            owner=old.owner,
            label=old.label,
            contact=old.contact,
            expires_at=expires if expires is None or expires > utc_now() else None,
            created_by=old.created_by,
            plan=old.plan,
            limits=old.limits,
            quota=old.quota,
            metadata=old.metadata,
            scopes=old.scopes,
            allowed_ips=old.allowed_ips,
            rolled_from=old.key_id,
        )
        ends = utc_now() + dt.timedelta(seconds=grace_s)
        if expires is not None and expires < ends:
            ends = expires
        updated = self.update(key_id, expires_at=ends, rolled_to=record.key_id)
        return updated or old, record, raw_key

    def get(self, key_id: str) -> KeyRecord | None:
        fields = self.redis.hgetall(self.names.record(key_id))
        return KeyRecord.from_redis(fields) if fields else None

    def list(self) -> builtins.list[KeyRecord]:
        """Every key (for the command line's straight-to-Redis listing)."""
        records: builtins.list[KeyRecord] = []
        cursor: str | None = "0"
        while cursor is not None:
            page = self.page(cursor=cursor, limit=500)
            records += page.items
            cursor = page.next_cursor
        return sorted(records, key=lambda record: (record.created_at, record.key_id))

    def page(
        self,
        *,
        cursor: str = "0",
        limit: int = 100,
        owner: str | None = None,
        status: str | None = None,
        plan: str | None = None,
    ) -> KeyPage:
        """One page of keys matching the filters, walked with SSCAN (never KEYS). The cursor
        is SSCAN's with an offset into its batch, so that a page never exceeds ``limit``."""
        scan_cursor, _, offset_text = cursor.partition(":")
        offset = int(offset_text or 0)
        items: builtins.list[KeyRecord] = []
        now_ms = int(utc_now().timestamp() * 1000)
        for _ in range(_MAX_SCANS_PER_PAGE):
            next_scan, batch = self._scan(scan_cursor, limit)
            records = self._records(sorted(batch)[offset:])
            for index, record in enumerate(records):
                if record is None or not _matches(record, now_ms, owner, status, plan):
                    continue
                items.append(record)
                if len(items) == limit:
                    rest = offset + index + 1
                    if rest < len(batch):
                        return KeyPage(items, f"{scan_cursor}:{rest}")
                    return KeyPage(items, None if next_scan == "0" else next_scan)
            offset = 0
            if next_scan == "0":
                return KeyPage(items, None)
            scan_cursor = next_scan
        return KeyPage(items, scan_cursor)

    def revoke(self, key_id: str) -> bool:
        changed = self._set_fields(key_id, revoked="1", revokedAt=iso(utc_now()) or "")
        if changed:
            self._announce("revoked", key_id)
        return changed

    def activate(self, key_id: str) -> bool:
        changed = self._set_fields(key_id, revoked="0", revokedAt="")
        if changed:
            self._announce("changed", key_id)
        return changed

    def delete(self, key_id: str) -> bool:
        plan = (self.redis.hget(self.names.record(key_id), "plan") or b"").decode()
        removed = self.redis.transaction(
            ("DEL", self.names.record(key_id)),
            ("SREM", self.names.all_ids, key_id),
            ("SREM", self.names.plan_keys(plan or DEFAULT_PLAN), key_id),
        )
        deleted = bool(removed[0])
        if deleted:
            self._announce("deleted", key_id)
        return deleted

    def count_admin_failure(self, client: str, window_s: int) -> int:
        """One more wrong admin token from ``client`` in the current window; the count."""
        return self.redis.incr_with_ttl(self.names.admin_failures(client), window_s)

    def _announce(self, event: str, key_id: str) -> None:
        """Tell every worker listening (grace mode) that this key changed. The change is
        stored already: an announcement Redis cannot take is not an error of the change."""
        try:
            self.redis.publish(self.names.events, f"{event}:{key_id}")
        except RedisUnavailable:
            log.warning("a key change could not be announced", extra={"key_id": key_id})

    def _store(self, key_id: str, mode: str, plan: str, fields: dict[str, str]) -> bool:
        args = [
            self.prefix,
            key_id,
            mode,
            plan,
            *field_args(fields),
        ]
        reply = self.redis.run_script(
            self._save, [self.names.record(key_id), self.names.all_ids], args
        )
        if reply == b"no_plan":
            raise NoSuchPlan(plan)
        return bool(reply == b"ok")

    def _scan(self, cursor: str, count: int) -> tuple[str, builtins.list[str]]:
        next_cursor, ids = self.redis.sscan(self.names.all_ids, int(cursor), count=count)
        return str(next_cursor), [key_id.decode() for key_id in ids]

    def _records(self, key_ids: builtins.list[str]) -> builtins.list[KeyRecord | None]:
        if not key_ids:
            return []
        found = self.redis.hgetall_many([self.names.record(key_id) for key_id in key_ids])
        return [KeyRecord.from_redis(fields) if fields else None for fields in found]

    def _set_fields(self, key_id: str, **fields: str) -> bool:
        return bool(
            self.redis.run_script(self._update, [self.names.record(key_id)], field_args(fields))
        )


_MAX_SCANS_PER_PAGE = 50  # a page of a sparse filter stops here and hands back a cursor


def _matches(
    record: KeyRecord, now_ms: int, owner: str | None, status: str | None, plan: str | None
) -> bool:
    if owner is not None and record.owner != owner:
        return False
    if plan is not None and (record.plan or DEFAULT_PLAN) != plan:
        return False
    return status is None or record.status(now_ms) == status
