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
from typing import Any, Literal

from proxy_app.redis import RedisService, field_args

DEFAULT_PLAN = "default"
QuotaPeriod = Literal["day", "month"]
QUOTA_PERIODS: tuple[QuotaPeriod, ...] = ("day", "month")


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
        self._delete = redis.script(__file__, "plan_delete.lua")
        self._save_script = redis.script(__file__, "plan_save.lua")

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

        fields = self.redis.hgetall(self.record(name))
        return Plan.from_redis(fields) if fields else None

    def key_count(self, name: str) -> int:
        return self.redis.scard(self.members(name))

    def list(self) -> list[tuple[Plan, int]]:
        names = sorted(name.decode() for name in self.redis.set_members(self.all_names, batch=500))
        found = self.redis.hgetall_many([self.record(name) for name in names])
        plans = [
            (Plan.from_redis(fields), self.key_count(name))
            for name, fields in zip(names, found, strict=True)
            if fields
        ]
        return [(self.default, self.key_count(DEFAULT_PLAN)), *plans]

    def create(self, plan: Plan) -> bool:
        """Store a new plan; False when one of that name exists."""
        return self._save("create", plan.name, plan.to_redis())

    def replace(self, plan: Plan) -> bool:
        """Replace an existing plan's limits and choices (keeping its creation time); False
        when there is none."""
        fields = plan.to_redis()
        del fields["createdAt"]
        return self._save("replace", plan.name, fields)

    def _save(self, mode: str, name: str, fields: dict[str, str]) -> bool:
        keys = [self.record(name), self.all_names]
        reply = self.redis.run_script(self._save_script, keys, [mode, name, *field_args(fields)])
        return bool(reply == 1)

    def delete(self, name: str) -> bool:
        """Delete an unused plan; raises PlanInUse when keys are on it."""
        reply = int(
            self.redis.run_script(
                self._delete, [self.record(name), self.members(name), self.all_names], [name]
            )
        )
        if reply < 0:
            raise PlanInUse(-reply)
        return reply == 1
