"""One request to an outside service, retried a bounded number of times.

Plane and Gitea both send through `send_with_retry`. It retries what a second try can cure:
transport errors (connect and read errors, timeouts, a dropped connection) and answers 5xx
and 429. It waits with exponential backoff and jitter, or for as long as the server's
Retry-After asks on a 429 or a 503; when that is over `max_wait_s` it gives up at once and
returns the answer, so a caller never hangs on a service that asks for an hour.

Repeating a request must not do anything twice. A non-idempotent request (POST, PATCH) is
therefore retried only when it certainly did not reach the server: a connection that could
not be opened (ConnectError, ConnectTimeout, PoolTimeout), or a 429, which is a refusal to
process it. A 5xx, a read timeout or a dropped connection may come after the server acted (a
comment or a PR created), so those end the attempt. A caller that knows a request is safe to
repeat (Plane's state PATCH) says so with `idempotent=True`.

Nothing here raises for the network: the last `httpx.Response`, or the last exception, is
returned for the caller to turn into a `Result`. Each retry is logged at info with the
method, the path and the reason; never a header, so never a token.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import httpx

log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Raised before any byte of the request left: safe to repeat whatever the method.
NOT_SENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
# Worth another try when the request may be repeated: the network or the server hiccuped.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
# What a request can raise that is the network's fault, not a bug: returned, never raised.
REQUEST_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, httpx.InvalidURL, OSError)
RETRY_AFTER_STATUSES = frozenset({429, 503})
NOT_IMPLEMENTED = 501  # a 5xx that no retry can cure


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` counts every try, the first included; waits grow from `base_s` by doubling
    up to `cap_s`; a Retry-After over `max_wait_s` is not waited for."""

    attempts: int = 3
    base_s: float = 0.5
    cap_s: float = 8.0
    max_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")
        if min(self.base_s, self.cap_s, self.max_wait_s) < 0:
            raise ValueError("retry waits cannot be negative")

    def backoff_s(self, retry: int) -> float:
        """The wait before retry number `retry` (1 for the first): "equal jitter", half the
        exponential step plus a random share of the other half, so clients that failed
        together do not come back together, and a wait is never close to zero."""
        step = min(self.cap_s, self.base_s * 2 ** max(0, retry - 1))
        return step / 2 + random.uniform(0, step / 2)


DEFAULT_POLICY = RetryPolicy()


def retry_after_s(response: httpx.Response, *, now: float | None = None) -> float | None:
    """Retry-After in seconds, from delta-seconds or an HTTP date (RFC 9110 §10.2.3); a date
    in the past is 0. None when the header is missing or unreadable."""
    raw = response.headers.get("Retry-After", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": the RFC's way of saying UTC
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


async def send_with_retry(
    client: httpx.AsyncClient,
    method: str,
    url: str | httpx.URL,
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    idempotent: bool | None = None,
    service: str = "http",
    scrub: Callable[[str], str] | None = None,
    **request: Any,
) -> httpx.Response | Exception:
    """Send `client.request(method, url, **request)`, retrying under `policy`.

    `idempotent` overrides the method's own semantics (GET, PUT, DELETE... are; POST and
    PATCH are not). `service` names the log lines; `scrub` cleans any text logged from an
    exception. Returns the final response (any status) or the final request exception.
    """
    method = method.upper()
    repeatable = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
    what = f"{method} {_path_of(url)}"
    clean = scrub or _unchanged
    attempt = 0
    while True:
        attempt += 1
        outcome: httpx.Response | Exception
        try:
            outcome = await client.request(method, url, **request)
        except REQUEST_ERRORS as exc:
            outcome = exc
        reason = _retry_reason(outcome, repeatable)
        if reason is None or attempt >= policy.attempts:
            return outcome
        wait = policy.backoff_s(attempt)
        if isinstance(outcome, httpx.Response) and outcome.status_code in RETRY_AFTER_STATUSES:
            asked = retry_after_s(outcome)
            if asked is not None and asked > policy.max_wait_s:
                log.info(
                    "%s: %s: %s with Retry-After %gs, over the %gs limit; not retrying",
                    service,
                    what,
                    reason,
                    asked,
                    policy.max_wait_s,
                )
                return outcome
            if asked is not None:
                wait, reason = asked, f"{reason} (Retry-After)"
        log.info(
            "%s: %s: %s; retry %d of %d in %.2fs",
            service,
            what,
            clean(reason),
            attempt,
            policy.attempts - 1,
            wait,
        )
        await asyncio.sleep(wait)


def _retry_reason(outcome: httpx.Response | Exception, repeatable: bool) -> str | None:
    """Why another try is worth it, or None when it is not (or not safe)."""
    if isinstance(outcome, httpx.Response):
        status = outcome.status_code
        if status == 429 or (repeatable and status >= 500 and status != NOT_IMPLEMENTED):
            return f"HTTP {status}"
        return None
    if isinstance(outcome, NOT_SENT_ERRORS) or (
        repeatable and isinstance(outcome, TRANSIENT_ERRORS)
    ):
        return describe_error(outcome)
    return None


def describe_error(exc: BaseException) -> str:
    """`ConnectError: [Errno 111] Connection refused`, or just the type when it says nothing."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _path_of(url: str | httpx.URL) -> str:
    """The path alone: no userinfo and no query string reach a log line."""
    try:
        return httpx.URL(str(url)).path or "/"
    except (httpx.InvalidURL, TypeError, ValueError):
        return "(invalid URL)"


def _unchanged(text: str) -> str:
    return text
