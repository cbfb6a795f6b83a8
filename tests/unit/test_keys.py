from __future__ import annotations

import datetime as dt
import re

import fakeredis
import pytest

from proxy_app.access.keys import KeyRegistry, generate_key, hash_key, key_id_of
from proxy_app.logging import redact
from proxy_app.redis import RedisService


@pytest.fixture
def fake() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def registry(fake: fakeredis.FakeRedis) -> KeyRegistry:
    return KeyRegistry(RedisService("redis://fake", timeout_ms=100, client=fake), "api-keys")


def test_keys_are_prefixed_high_entropy_and_unique() -> None:
    keys = {generate_key()[1] for _ in range(200)}
    assert len(keys) == 200
    for raw in keys:
        assert re.fullmatch(r"pk_[A-Za-z0-9]{12}_[A-Za-z0-9_-]{43}", raw)


def test_key_id_is_read_from_a_well_formed_key_only() -> None:
    key_id, raw = generate_key()
    assert key_id_of(raw) == key_id
    for bad in ("", "pk_", "pk_short_x", raw + "x", raw.replace("pk_", "sk_"), raw[:-1]):
        assert key_id_of(bad) is None


def test_generated_keys_are_redacted_from_logs() -> None:
    _, raw = generate_key()
    assert raw not in redact(f"header x-api-key: {raw}")


def test_only_a_hash_and_metadata_are_stored(
    registry: KeyRegistry, fake: fakeredis.FakeRedis
) -> None:
    record, raw = registry.create(owner="acme", label="ci", contact="ops@acme.test")
    stored = fake.hgetall(f"api-keys:key:{record.key_id}")
    assert stored[b"hash"] == hash_key(raw).encode()
    stored_values = [
        value if isinstance(value, bytes) else value.encode()
        for key in fake.scan_iter()
        if fake.type(key) == b"hash"
        for value in fake.hgetall(key).values()
    ]
    everything = b"".join(stored_values)
    assert raw.encode() not in everything
    assert raw.split("_", 2)[2].encode() not in everything  # nor the secret part
    assert fake.ttl(f"api-keys:key:{record.key_id}") == -1  # never evicted by volatile-* policies


def test_record_json_has_metadata_never_the_hash(registry: KeyRegistry) -> None:
    expires = dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    record, _ = registry.create(owner="acme", expires_at=expires, created_by="alice")
    shown = record.to_json()
    assert shown == {
        "keyId": record.key_id,
        "owner": "acme",
        "label": None,
        "contact": None,
        "createdAt": record.created_at,
        "createdBy": "alice",
        "expiresAt": "2031-01-02T03:04:05Z",
        "revoked": False,
        "revokedAt": None,
        "status": "active",
        "plan": "default",
        "limits": None,
        "quota": None,
        "metadata": None,
        "scopes": None,
        "allowedIps": None,
        "lastUsedAt": None,
        "rolledTo": None,
        "rolledFrom": None,
    }
    assert registry.get(record.key_id) == record


def test_lifecycle(registry: KeyRegistry) -> None:
    first, _ = registry.create(owner="a")
    second, _ = registry.create(owner="b")
    assert [r.key_id for r in registry.list()] == sorted(
        [first.key_id, second.key_id],
        key=lambda k: (registry.get(k).created_at, k),  # type: ignore[union-attr]
    )
    assert registry.revoke(first.key_id)
    revoked = registry.get(first.key_id)
    assert revoked is not None
    assert revoked.revoked
    assert revoked.revoked_at is not None
    assert registry.activate(first.key_id)
    assert registry.get(first.key_id) == first
    assert registry.delete(first.key_id)
    assert registry.get(first.key_id) is None
    assert [r.key_id for r in registry.list()] == [second.key_id]


def test_changing_an_unknown_key_creates_nothing(
    registry: KeyRegistry, fake: fakeredis.FakeRedis
) -> None:
    assert not registry.revoke("doesnotexist")
    assert not registry.activate("doesnotexist")
    assert not registry.delete("doesnotexist")
    assert fake.keys("*") == []
