"""engine.http_retry.send_with_retry against tiny real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web

from engine.http_retry import RetryPolicy, retry_after_s, send_with_retry

TOKEN = "s3cr3t-retry-t0ken"
FAST = RetryPolicy(attempts=3, base_s=0.01, cap_s=0.02, max_wait_s=5)


@dataclass
class Server:
    """Answers each request with the next scripted (status, headers); the last one repeats."""

    answers: list[tuple[int, dict[str, str]]]
    delay_s: float = 0.0
    url: str = ""
    seen: list[tuple[str, str]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path))
        await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status, headers = self.answers[min(len(self.seen), len(self.answers)) - 1]
        echo = request.headers.get("Authorization", "")
        return web.json_response({"message": f"answer for {echo}"}, status=status, headers=headers)

    @property
    def methods(self) -> list[str]:
        return [method for method, _ in self.seen]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(*answers: tuple[int, dict[str, str]] | int, delay_s: float = 0) -> Server:
        script = [(a, {}) if isinstance(a, int) else a for a in answers]
        server = Server(script, delay_s)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", server.handle)
        server.runner = web.AppRunner(app, access_log=None)
        await server.runner.setup()
        await web.TCPSite(server.runner, "127.0.0.1", 0).start()
        server.url = f"http://127.0.0.1:{server.runner.addresses[0][1]}"
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.runner is not None
        await server.runner.cleanup()


class CountingTransport(httpx.AsyncHTTPTransport):
    """The real transport, counting the requests it was asked to send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return await super().handle_async_request(request)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def client_for(
    url: str, timeout_s: float = 5, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"token {TOKEN}"},
        timeout=timeout_s,
        transport=transport,
    )


def retries_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "engine.http_retry"]


# --- what is retried -------------------------------------------------------------------------


async def test_get_succeeds_after_two_502s(serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = await serve(502, 502, 200)
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "GET", "/x", policy=FAST, service="svc")

    assert isinstance(answer, httpx.Response) and answer.status_code == 200
    assert server.methods == ["GET"] * 3
    logged = retries_logged(caplog)
    assert len(logged) == 2
    assert logged[0].startswith("svc: GET /x: HTTP 502; retry 1 of 2 in ")
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "engine.http_retry")


async def test_gives_up_after_the_configured_attempts_with_the_last_answer(serve) -> None:
    server = await serve(500, 502, 504, 200)
    policy = RetryPolicy(attempts=2, base_s=0.01, cap_s=0.01)
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "GET", "/x", policy=policy)

    assert isinstance(answer, httpx.Response) and answer.status_code == 502
    assert len(server.seen) == 2


@pytest.mark.parametrize("status", [400, 401, 404, 409, 501])
async def test_answers_no_retry_can_cure_are_returned_at_once(serve, status: int) -> None:
    server = await serve(status, 200)
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "GET", "/x", policy=FAST)

    assert isinstance(answer, httpx.Response) and answer.status_code == status
    assert len(server.seen) == 1


async def test_a_single_attempt_policy_never_retries(serve) -> None:
    server = await serve(503, 200)
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "GET", "/x", policy=RetryPolicy(attempts=1))

    assert isinstance(answer, httpx.Response) and answer.status_code == 503
    assert len(server.seen) == 1


# --- Retry-After -----------------------------------------------------------------------------


async def test_retry_after_on_a_503_is_honoured(serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = await serve((503, {"Retry-After": "1"}), 200)
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "GET", "/x", policy=FAST)

    assert isinstance(answer, httpx.Response) and answer.status_code == 200
    assert len(server.seen) == 2
    # the wait came from the header, not from the (0.01 s) backoff
    assert retries_logged(caplog) == ["http: GET /x: HTTP 503 (Retry-After); retry 1 of 2 in 1.00s"]


async def test_retry_after_as_an_http_date_is_honoured(serve) -> None:
    now = email.utils.formatdate(time.time(), usegmt=True)  # already due: no wait
    server = await serve((429, {"Retry-After": now}), 200)
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "GET", "/x", policy=FAST)

    assert isinstance(answer, httpx.Response) and answer.status_code == 200
    assert len(server.seen) == 2


async def test_a_429_asking_for_more_than_the_limit_fails_at_once(
    serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await serve((429, {"Retry-After": "3600"}), 200)
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "GET", "/x", policy=FAST)

    assert isinstance(answer, httpx.Response) and answer.status_code == 429
    assert len(server.seen) == 1
    assert "Retry-After 3600s, over the 5s limit; not retrying" in caplog.text


async def test_a_429_without_retry_after_backs_off(serve) -> None:
    server = await serve(429, 429, 200)
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "GET", "/x", policy=FAST)

    assert isinstance(answer, httpx.Response) and answer.status_code == 200
    assert len(server.seen) == 3


# --- requests that must not run twice --------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_post_is_not_repeated_after_a_5xx(serve, status: int) -> None:
    server = await serve((status, {"Retry-After": "0"}), 201)
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "POST", "/x", policy=FAST, json={"a": 1})

    assert isinstance(answer, httpx.Response) and answer.status_code == status
    assert server.methods == ["POST"]


async def test_a_patch_is_repeated_only_when_the_caller_says_it_is_safe(serve) -> None:
    unsafe = await serve(502, 200)
    safe = await serve(502, 200)
    async with client_for(unsafe.url) as client:
        first = await send_with_retry(client, "PATCH", "/x", policy=FAST, json={})
    async with client_for(safe.url) as client:
        second = await send_with_retry(client, "PATCH", "/x", policy=FAST, json={}, idempotent=True)

    assert isinstance(first, httpx.Response) and first.status_code == 502
    assert isinstance(second, httpx.Response) and second.status_code == 200
    assert (len(unsafe.seen), len(safe.seen)) == (1, 2)


async def test_a_post_refused_with_429_is_repeated(serve) -> None:
    """A 429 means the request was refused unprocessed, so repeating it creates nothing twice."""
    server = await serve((429, {"Retry-After": "0"}), 201)
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "POST", "/x", policy=FAST, json={})

    assert isinstance(answer, httpx.Response) and answer.status_code == 201
    assert server.methods == ["POST", "POST"]


async def test_a_post_to_a_closed_port_is_retried_then_returns_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    transport = CountingTransport()
    async with client_for(closed_port_url(), transport=transport) as client:
        answer = await send_with_retry(client, "POST", "/x", policy=FAST, json={})

    assert isinstance(answer, httpx.ConnectError)
    assert transport.sent == FAST.attempts
    assert len(retries_logged(caplog)) == FAST.attempts - 1
    assert "ConnectError" in caplog.text and TOKEN not in caplog.text


async def test_a_read_timeout_repeats_a_get_but_not_a_post(serve) -> None:
    server = await serve(200, delay_s=0.3)
    async with client_for(server.url, timeout_s=0.05) as client:
        got = await send_with_retry(client, "GET", "/x", policy=FAST)
        posted = await send_with_retry(client, "POST", "/x", policy=FAST, json={})

    assert isinstance(got, httpx.ReadTimeout) and isinstance(posted, httpx.ReadTimeout)
    assert server.methods == ["GET", "GET", "GET", "POST"]


@pytest.fixture
async def dropping_server() -> AsyncIterator[tuple[str, list[int]]]:
    """Reads a request, then hangs up without an answer."""
    connections: list[int] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", connections
    server.close()
    await server.wait_closed()


async def test_a_dropped_connection_repeats_a_get_but_not_a_post(dropping_server) -> None:
    url, connections = dropping_server
    async with client_for(url) as client:
        got = await send_with_retry(client, "GET", "/x", policy=FAST)
        get_connections = len(connections)
        posted = await send_with_retry(client, "POST", "/x", policy=FAST, json={})

    assert isinstance(got, httpx.RemoteProtocolError)
    assert isinstance(posted, httpx.RemoteProtocolError)
    assert get_connections == 3 and len(connections) == 4


# --- never a secret in a log line ------------------------------------------------------------


async def test_the_token_never_reaches_the_log(serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = await serve(502, (429, {"Retry-After": "0"}), (503, {"Retry-After": "999"}))
    async with client_for(server.url) as client:
        answer = await send_with_retry(client, "GET", "/x", policy=FAST)

    assert isinstance(answer, httpx.Response) and answer.status_code == 503
    assert TOKEN in answer.text  # the server echoed it; the caller scrubs what it reports
    assert len(server.seen) == 3
    assert retries_logged(caplog) and TOKEN not in caplog.text


async def test_scrub_cleans_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with client_for(closed_port_url()) as client:
        await send_with_retry(
            client, "GET", "/x", policy=FAST, scrub=lambda text: text.replace("Error", "E***")
        )

    assert "ConnectE***" in caplog.text and "ConnectError" not in caplog.text


# --- the pieces ------------------------------------------------------------------------------


def answer_with(retry_after: str | None) -> httpx.Response:
    return httpx.Response(429, headers={"Retry-After": retry_after} if retry_after else {})


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        (" 2 ", 2.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_s(header: str | None, seconds: float | None) -> None:
    assert retry_after_s(answer_with(header)) == seconds


def test_retry_after_s_reads_an_http_date_against_now() -> None:
    now = 1_700_000_000.0
    later = email.utils.formatdate(now + 30, usegmt=True)
    no_zone = email.utils.formatdate(now + 30).replace("+0000", "-0000")

    assert retry_after_s(answer_with(later), now=now) == 30.0
    assert retry_after_s(answer_with(no_zone), now=now) == 30.0


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=8)
    for retry, step in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)]:
        waits = [policy.backoff_s(retry) for _ in range(200)]
        assert all(step / 2 <= wait <= step for wait in waits)
        assert len(set(waits)) > 1  # jittered


@pytest.mark.parametrize(
    "options", [{"attempts": 0}, {"base_s": -1}, {"cap_s": -1}, {"max_wait_s": -1}]
)
def test_a_nonsense_policy_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**options)
