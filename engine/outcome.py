"""What an adapter to an outside service returns instead of raising."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Result(Generic[T]):
    ok: bool
    value: T | None = None
    error: str | None = None  # one clear line, never a secret
    status: int | None = None  # the HTTP status, when the service answered

    @classmethod
    def success(cls, value: T, status: int | None = None) -> Result[T]:
        return cls(True, value, None, status)

    @classmethod
    def failure(cls, error: str, status: int | None = None) -> Result[T]:
        return cls(False, None, error, status)
