"""What a worker remembers of keys for grace mode, and how it judges them while Redis is away."""

from __future__ import annotations

import time

import pytest

from proxy_app.access.grace import GraceMemory
from proxy_app.access.plans import Limit

NOW_MS = int(time.time() * 1000)


def remember(memory: GraceMemory, key_id: str = "k1", **overrides: object) -> None:
    values: dict[str, object] = {
        "plan": "default",
        "limits": (Limit(10, 60),),
        "expires_at_ms": 0,
        "restricted": False,
    }
    values.update(overrides)
    memory.remember(key_id, "hash-" + key_id, **values)  # type: ignore[arg-type]


def test_a_remembered_key_is_served_within_its_share_of_each_limit() -> None:
    memory = GraceMemory(grace_s=60, share=4)
    remember(memory, limits=(Limit(10, 60), Limit(100, 3600)))
    verdicts = [memory.judge("k1", "hash-k1", NOW_MS) for _ in range(3)]
    assert [v.outcome for v in verdicts] == ["ok", "ok", "limited"]  # 10 // 4 = 2
    assert verdicts[0].limits == (Limit(2, 60), Limit(25, 3600))
    assert verdicts[0].states[0].remaining == 1
    assert verdicts[2].retry_after_ms > 0


@pytest.mark.parametrize(
    ("change", "outcome"),
    [
        (lambda m: None, "ok"),
        (lambda m: m.mark("k1", "revoked"), "revoked"),
        (lambda m: m.mark("k1", "deleted"), "deleted"),
        (lambda m: m.forget("k1"), "unknown"),
        (lambda m: m.forget(), "unknown"),
    ],
)
def test_events_change_what_a_key_gets(change: object, outcome: str) -> None:
    memory = GraceMemory(grace_s=60, share=1)
    remember(memory)
    change(memory)  # type: ignore[operator]
    assert memory.judge("k1", "hash-k1", NOW_MS).outcome == outcome


def test_a_wrong_secret_an_expiry_a_restriction_or_an_old_validation_is_not_served() -> None:
    memory = GraceMemory(grace_s=60, share=1)
    remember(memory, "k1")
    assert memory.judge("k1", "hash-other", NOW_MS).outcome == "unknown"
    remember(memory, "k2", expires_at_ms=NOW_MS - 1)
    assert memory.judge("k2", "hash-k2", NOW_MS).outcome == "expired"
    remember(memory, "k3", restricted=True)
    assert memory.judge("k3", "hash-k3", NOW_MS).outcome == "unknown"
    stale = GraceMemory(grace_s=0, share=1)
    remember(stale, "k4")
    time.sleep(0.01)
    assert stale.judge("k4", "hash-k4", NOW_MS).outcome == "unknown"


def test_memory_is_bounded_forgetting_the_least_recently_validated() -> None:
    memory = GraceMemory(grace_s=60, share=1, capacity=3)
    for key_id in ("a", "b", "c"):
        remember(memory, key_id)
    remember(memory, "a")  # validated again: the most recent
    remember(memory, "d")
    assert memory.judge("b", "hash-b", NOW_MS).outcome == "unknown"
    assert {memory.judge(k, f"hash-{k}", NOW_MS).outcome for k in ("a", "c", "d")} == {"ok"}
