from __future__ import annotations

from proxy_app.memo import remembered


def test_short_arguments_are_worked_out_once_long_ones_every_time() -> None:
    calls: list[str] = []

    @remembered(most=2, longest=5)
    def upper(text: str) -> str:
        calls.append(text)
        return text.upper()

    assert [upper("abc"), upper("abc"), upper("abcdef"), upper("abcdef")] == [
        "ABC",
        "ABC",
        "ABCDEF",
        "ABCDEF",
    ]
    assert calls == ["abc", "abcdef", "abcdef"]


def test_only_the_most_recent_are_kept() -> None:
    calls: list[str] = []

    @remembered(most=2, longest=5)
    def same(text: str) -> str:
        calls.append(text)
        return text

    for text in ("a", "b", "c", "a"):  # "a" was pushed out by "c"
        same(text)
    assert calls == ["a", "b", "c", "a"]
