"""Plans: named sets of rate limits and a quota that keys are put on, kept in Redis so that a
change reaches every key on the plan, on every replica, with its next request.

A plan has one or more limits (a request must fit all of them: say 10 per second and 10,000 per
day), optionally a quota that refills at the start of each UTC day or month, and two choices:
``cacheHitsFree`` (answers from the cache count against nothing) and ``shareByOwner`` (all keys
of one owner draw on one set of limits and one quota). The settings' global limit is the
implicit plan ``default``.

Limits and quotas are stored in a compact text form the key-check script reads without a JSON
decoder: limits ``"10:1000;10000:86400000"`` (max:window in ms, ``;``-separated) and quota
``"10000:day"``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Literal

from proxy_app.redis import RedisService

DEFAULT_PLAN = "default"
QuotaPeriod = Literal["day", "month"]
QUOTA_PERIODS: tuple[QuotaPeriod, ...] = ("day", "month")
_LUA_DIR = Path(__file__).with_name("lua")


@dataclasses.dataclass(frozen=True, slots=True)
class Limit:
    max: int
    window_s: int

    def to_json(self) -> dict[str, int]:
        return {"max": self.max, "windowSeconds": self.window_s}


@dataclasses.dataclass(frozen=True, slots=True)
class Quota:
    max: int
    period: QuotaPeriod

    def to_json(self) -> dict[str, Any]:
        return {"max": self.max, "period": self.period}


def encode_limits(limits: tuple[Limit, ...]) -> str:
    return ";".join(f"{limit.max}:{limit.window_s * 1000}" for limit in limits)


@functools.lru_cache(maxsize=1024)
def decode_limits(text: str) -> tuple[Limit, ...]:
    """The stored form back into limits; cached, as the key check meets the same few forms."""
    limits = []
    for item in text.split(";"):
        if item:
            maximum, window_ms = item.split(":")
            limits.append(Limit(int(maximum), int(window_ms) // 1000))
    return tuple(limits)


def encode_quota(quota: Quota | None) -> str:
    return f"{quota.max}:{quota.period}" if quota is not None else ""


@functools.lru_cache(maxsize=1024)
def decode_quota(text: str) -> Quota | None:
    if not text:
        return None
    maximum, period = text.split(":")
    return Quota(int(maximum), "month" if period == "month" else "day")


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    name: str
    limits: tuple[Limit, ...]
    quota: Quota | None = None
    cache_hits_free: bool = False
    share_by_owner: bool = False
    created_at: str | None = None
    updated_at: str | None = None

    def to_json(self, *, keys: int | None = None) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "name": self.name,
            "limits": [limit.to_json() for limit in self.limits],
            "quota": self.quota.to_json() if self.quota is not None else None,
            "cacheHitsFree": self.cache_hits_free,
            "shareByOwner": self.share_by_owner,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }
        if self.name == DEFAULT_PLAN:
            shown["implicit"] = True  # the settings' limit; not stored, not editable here
        if keys is not None:
            shown["keys"] = keys
        return shown

    def to_redis(self) -> dict[str, str]:
        return {
            "name": self.name,
            "limits": encode_limits(self.limits),
            "quota": encode_quota(self.quota),
            "cacheHitsFree": "1" if self.cache_hits_free else "0",
            "shareByOwner": "1" if self.share_by_owner else "0",
            "createdAt": self.created_at or "",
            "updatedAt": self.updated_at or "",
        }

    @classmethod
    def from_redis(cls, fields: dict[bytes, bytes]) -> Plan:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(
            name=text["name"],
            limits=decode_limits(text.get("limits", "")),
            quota=decode_quota(text.get("quota", "")),
            cache_hits_free=text.get("cacheHitsFree") == "1",
            share_by_owner=text.get("shareByOwner") == "1",
            created_at=text.get("createdAt") or None,
            updated_at=text.get("updatedAt") or None,
        )


class PlanInUse(Exception):
    def __init__(self, keys: int) -> None:
        super().__init__(f"{keys} keys use the plan")
        self.keys = keys


class PlanRegistry:
    """Create, read, replace and delete plans. Raises RedisUnavailable when Redis is."""

    def __init__(self, redis: RedisService, prefix: str, default_limit: Limit) -> None:
        self.redis = redis
        self.prefix = prefix
        self.default = Plan(DEFAULT_PLAN, (default_limit,))
        self._delete = redis.client.register_script((_LUA_DIR / "plan_delete.lua").read_text())

    def record(self, name: str) -> str:
        return f"{self.prefix}:plan:{name}"

    def members(self, name: str) -> str:
        """The set of ids of the keys on a plan: counted before a delete, never scanned."""
        return f"{self.prefix}:plan-keys:{name}"

    @property
    def all_names(self) -> str:
        return f"{self.prefix}:plans"

    def get(self, name: str) -> Plan | None:
        if name == DEFAULT_PLAN:
            return self.default

        def fetch(client: Any) -> dict[bytes, bytes]:
            return client.hgetall(self.record(name))  # type: ignore[no-any-return]

        fields = self.redis.call(fetch)
        return Plan.from_redis(fields) if fields else None

    def exists(self, name: str) -> bool:
        if name == DEFAULT_PLAN:
            return True
        return bool(self.redis.call(lambda client: client.exists(self.record(name))))

    def key_count(self, name: str) -> int:
        return int(self.redis.call(lambda client: client.scard(self.members(name))))

    def list(self) -> list[tuple[Plan, int]]:
        def fetch(client: Any) -> list[Any]:
            names = sorted(name.decode() for name in client.smembers(self.all_names))
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.record(name))
                pipe.scard(self.members(name))
            return list(pipe.execute())

        replies = self.redis.call(fetch)
        plans = [
            (Plan.from_redis(replies[i]), int(replies[i + 1]))
            for i in range(0, len(replies), 2)
            if replies[i]
        ]
        default_keys = self.key_count(DEFAULT_PLAN)
        return [(self.default, default_keys), *plans]

    def create(self, plan: Plan) -> bool:
        """Store a new plan; False when one of that name exists."""

        def store(client: Any) -> bool:
            if not client.hsetnx(self.record(plan.name), "name", plan.name):
                return False
            pipe = client.pipeline(transaction=True)
            pipe.hset(self.record(plan.name), mapping=plan.to_redis())
            pipe.sadd(self.all_names, plan.name)
            pipe.execute()
            return True

        return bool(self.redis.call(store))

    def replace(self, plan: Plan) -> bool:
        """Replace an existing plan's limits and choices; False when there is none."""

        def store(client: Any) -> bool:
            created = client.hget(self.record(plan.name), "createdAt")
            if created is None:
                return False
            fields = plan.to_redis()
            fields["createdAt"] = created.decode()
            client.hset(self.record(plan.name), mapping=fields)
            return True

        return bool(self.redis.call(store))

    def delete(self, name: str) -> bool:
        """Delete an unused plan; raises PlanInUse when keys are on it."""
        reply = int(
            self.redis.call(
                lambda client: self._delete(
                    keys=[self.record(name), self.members(name), self.all_names],
                    args=[name],
                    client=client,
                )
            )
        )
        if reply < 0:
            raise PlanInUse(-reply)
        return reply == 1
