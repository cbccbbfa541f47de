"""A spy for the tests that check which path ran: wrap a function so every call is recorded."""

from __future__ import annotations

from typing import Any


def record_calls(monkeypatch, owner: Any, name: str) -> list[tuple]:
    """Replace ``owner.name`` (for the test) by a wrapper that appends each call's positional
    arguments to the returned list, then calls the original."""
    real = getattr(owner, name)
    calls: list[tuple] = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls
