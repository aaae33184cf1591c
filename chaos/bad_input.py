"""Bad input: generated webhook bodies and headers posted to the running app.

Hypothesis draws the cases: a fixed seed, generation only, no database, no shrinking, and no
draw that depends on this run's random ids, so a seed gives the same cases for the same code
(Hypothesis also mixes in literals it finds in the project's own modules, so the cases follow
the code as it changes). Each case starts from a real delivery of the running board, and is
made wrong in one way:

- a bad signature: missing, empty, wrong, made with another secret or over another body,
  truncated, not hex, raw non-UTF-8 bytes; over any body, including deliveries that would
  act if they were signed (start an issue, approve, reject, move a head, merge);
- signed but malformed: truncated JSON, a wrong type at a field the engine reads, random
  JSON, junk bytes, deep nesting, invalid UTF-8, a body over the size limit;
- signed and well formed but strange where the engine has nothing to act on: huge strings,
  unusual unicode (lone surrogates, NUL, bidi controls), odd or missing headers.

Wrong types and truncation start from deliveries that would act; huge strings, unicode and
header changes from deliveries that would change nothing anyway (a well-formed delivery is
allowed to act). Checked: no answer 5xx or lost; every bad signature refused with 401 (413
for a body over the limit, or a 400 from the HTTP parser when a header's bytes are not even
HTTP); the store tables a delivery could change hash the same; neither Plane nor Telegram
was called. Where something acted, the recorded delivery names the case. Each 5xx case is
posted again alone: one that then passes failed only because a neighbour spoiled the commit
they shared.

The app's server and processing tracebacks are muted while the cases run: the figures count
them, and a thousand tracebacks would drown the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from chaos.bounce import SetUp, task_of_issue, until_resting
from chaos.harness import (
    GITEA_SECRET,
    PLANE_SECRET,
    Outcome,
    Stack,
    agent_env,
    bounded,
    hex_hmac,
    state_change,
)
from engine.stages import Status
from engine.store import Store, Task
from engine.webhooks import MAX_BODY_BYTES

CONCURRENCY = 32
RAW_TIMEOUT_S = 30
# table -> the column its rows are ordered by
STATE_TABLES = {
    "tasks": "id",
    "events": "id",
    "jobs": "id",
    "agent_runs": "id",
    "cards": "task_id",
    "pending_replies": "rowid",
    "tracker_sync": "task_id",
    "merge_leases": "repo",
}
SECRETS = {"plane": PLANE_SECRET, "gitea": GITEA_SECRET}
SIGNATURE_HEADER = {"plane": "X-Plane-Signature", "gitea": "X-Gitea-Signature"}
DELIVERY_HEADER = {"plane": "X-Plane-Delivery", "gitea": "X-Gitea-Delivery"}
# processing outcomes that mean a delivery did something (engine.webhooks)
ACTING = ("started", "answers given", "approved", "rejected", "advanced", "done", "head recorded")
MUTED_LOGGERS = ("aiohttp.server", "aiohttp.web", "engine.webhooks", "asyncio")

FieldPath = tuple[str | int, ...]
JSON_KINDS: dict[type, st.SearchStrategy] = {
    type(None): st.none(),
    bool: st.booleans(),
    int: st.integers(min_value=-(2**70), max_value=2**70),
    float: st.floats(allow_nan=True, allow_infinity=True),
    str: st.text(max_size=20),
    list: st.lists(st.integers() | st.text(max_size=5), max_size=3),
    dict: st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
}


@dataclass(frozen=True)
class Base:
    """A real delivery of the board: what the engine reads in it and what it may vary."""

    name: str
    source: str
    event: str
    payload: dict
    acts: bool  # signed and intact, it would change something
    typed: dict[FieldPath, tuple[type, ...]]  # fields the engine reads -> the types they may have
    texts: tuple[FieldPath, ...] = ()  # string fields whose other values still change nothing


@dataclass(frozen=True)
class Case:
    kind: str  # what is wrong with it
    source: str
    body: bytes
    headers: tuple[tuple[str, bytes], ...]
    expect: int | None  # the answer it must get; None: anything below 500
    note: str = ""

    @property
    def raw(self) -> bool:
        """Header bytes an HTTP client library refuses to send: needs a raw socket."""
        try:
            for _, value in self.headers:
                value.decode("ascii")
        except UnicodeDecodeError:
            return True
        return False


@dataclass
class Results:
    statuses: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    server_errors: list[tuple[Case, int]] = field(default_factory=list)
    unrefused: list[tuple[Case, int]] = field(default_factory=list)
    lost: list[tuple[Case, str]] = field(default_factory=list)
    by_parser: int = 0  # answered 400 by the HTTP parser, before the app
    index: dict[str, Case] = field(default_factory=dict)  # delivery id -> case


# --- the board the cases start from ---------------------------------------------------------


def _lite(state: dict) -> dict:
    return {key: state[key] for key in ("id", "name", "color", "group")}


def _in_state(stack: Stack, issue: dict, name: str) -> dict:
    states = {state["name"]: state for state in stack.plane.states(stack.project_id)}
    return {**issue, "state": _lite(states[name])}


def _plane_state(issue: dict) -> dict:
    return json.loads(state_change(issue, "state_id"))


PLANE_TYPED: dict[FieldPath, tuple[type, ...]] = {
    ("action",): (str,),
    ("data",): (dict,),
    ("data", "id"): (str,),
    ("data", "project"): (str,),
    ("data", "state"): (dict, str, type(None)),
    ("data", "state", "name"): (str, type(None)),
    ("data", "state", "group"): (str, type(None)),
    ("data", "name"): (str, type(None)),
    ("data", "description_html"): (str, type(None)),
    ("data", "sequence_id"): (int, type(None)),
    ("activity",): (dict, type(None)),
    ("activity", "field"): (str, type(None)),
}
PLANE_TEXTS: tuple[FieldPath, ...] = (
    ("data", "name"),
    ("data", "description_html"),
    ("data", "updated_at"),
    ("data", "state", "name"),
    ("data", "state", "color"),
    ("activity", "new_value"),
    ("activity", "actor", "display_name"),
)


def _plane_bases(stack: Stack, waiting: dict, fresh: dict) -> list[Base]:
    """`waiting` has a task awaiting BRD approval, `fresh` is on the board with no task."""
    in_progress = _in_state(stack, waiting, "In Progress")
    priority = _plane_state(in_progress)
    priority["activity"].update(field="priority", old_value="none", new_value="high")
    elsewhere = _plane_state({**_in_state(stack, fresh, "In Progress"), "project": "p-unknown"})
    comment = {
        "event": "issue_comment",
        "action": "created",
        "webhook_id": "w-1",
        "workspace_id": "ws-1",
        "data": {
            "id": "c-1",
            "comment_html": "<p>Looks good</p>",
            "issue": waiting["id"],
            "project": stack.project_id,
        },
        "activity": {"field": None, "old_value": None, "new_value": None, "actor": {"id": "u"}},
    }
    comment_texts: tuple[FieldPath, ...] = (("data", "comment_html"),)

    def plane(name: str, payload: dict, acts: bool, texts: tuple[FieldPath, ...] = ()) -> Base:
        typed = {p: t for p, t in PLANE_TYPED.items() if _has(payload, p)}
        return Base(name, "plane", payload["event"], payload, acts, typed, texts)

    return [
        plane("in progress, task exists", _plane_state(in_progress), False, PLANE_TEXTS),
        plane("priority changed", priority, False, PLANE_TEXTS),
        plane("unknown project", elsewhere, False, PLANE_TEXTS),
        plane("comment", comment, False, comment_texts),
        plane("start a fresh issue", _plane_state(_in_state(stack, fresh, "In Progress")), True),
        plane("approve", _plane_state(_in_state(stack, waiting, "Approved")), True),
        plane("reject", _plane_state(_in_state(stack, waiting, "Rejected")), True),
    ]


def _repository() -> dict:
    return {"id": 1, "name": "app", "full_name": "team/app", "owner": {"login": "team"}}


REPO_TYPED: dict[FieldPath, tuple[type, ...]] = {
    ("repository",): (dict,),
    ("repository", "full_name"): (str,),
}


def _gitea_bases(task: Task) -> list[Base]:
    """Pushes, statuses and pull requests: for nothing, and for the waiting task's branch."""
    sha = "0" * 40
    push_typed = {
        **REPO_TYPED,
        ("ref",): (str,),
        ("after",): (str,),
        ("before",): (str, type(None)),
    }
    status_typed = {**REPO_TYPED, **{(k,): (str,) for k in ("sha", "context", "state")}}
    pr_typed = {
        **REPO_TYPED,
        ("number",): (int,),
        ("action",): (str,),
        ("pull_request",): (dict,),
        ("pull_request", "merged"): (bool, type(None)),
        ("pull_request", "head"): (dict,),
        ("pull_request", "head", "ref"): (str,),
        ("pull_request", "head", "sha"): (str,),
    }

    def push(branch: str, before: str | None) -> dict:
        after = hashlib.sha1(f"{branch}{before}".encode()).hexdigest()
        return {"ref": f"refs/heads/{branch}", "before": before, "after": after, "commits": []}

    def pull(action: str, branch: str, merged: bool) -> dict:
        head = {"ref": branch, "sha": task.head_sha or sha}
        return {
            "action": action,
            "number": 7,
            "pull_request": {"number": 7, "merged": merged, "head": head, "title": "Change"},
        }

    status = {"sha": sha, "context": "ci/tests", "state": "success", "description": "ok"}
    nobody = "nobody-branch"
    specs = [
        ("push, no task", "push", push(nobody, sha), False, push_typed, (("ref",), ("after",))),
        ("status, no task", "status", status, False, status_typed, (("context",), ("state",))),
        ("pr opened", "pull_request", pull("opened", nobody, False), False, pr_typed, ()),
        ("push the task's head", "push", push(task.branch, task.head_sha), True, push_typed, ()),
        (
            "merge the task's pr",
            "pull_request",
            pull("closed", task.branch, True),
            True,
            pr_typed,
            (),
        ),
    ]
    return [
        Base(
            name,
            "gitea",
            event,
            {**body, "repository": _repository(), "sender": {"login": "ci"}},
            acts,
            typed,
            texts,
        )
        for name, event, body, acts, typed, texts in specs
    ]


# --- editing payloads -----------------------------------------------------------------------


def _has(payload: Any, path: FieldPath) -> bool:
    for key in path:
        if not isinstance(payload, dict) or key not in payload:
            return False
        payload = payload[key]
    return True


def _with(payload: dict, path: FieldPath, value: Any) -> dict:
    edited = copy.deepcopy(payload)
    parent = edited
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return edited


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, allow_nan=True).encode()


def _headers(base_source: str, event: str, delivery: bool = True) -> dict[str, bytes]:
    """The headers the real sender puts on a delivery of `event` (no signature yet)."""
    headers = {"Content-Type": b"application/json"}
    if base_source == "plane":
        headers["X-Plane-Event"] = event.encode()
    else:
        group = "pull_request" if event.startswith("pull_request") else event
        headers["X-Gitea-Event"] = group.encode()
        headers["X-Gitea-Event-Type"] = event.encode()
    if delivery:
        headers[DELIVERY_HEADER[base_source]] = b""  # filled in with the case's own id
    return headers


def _signed(source: str, body: bytes, headers: dict[str, bytes]) -> dict[str, bytes]:
    return {**headers, SIGNATURE_HEADER[source]: hex_hmac(SECRETS[source], body).encode()}


def _case(
    kind: str, base: Base, body: bytes, headers: dict[str, bytes], expect: int | None, note: str
) -> Case:
    if len(body) > MAX_BODY_BYTES:
        expect = 413
    return Case(kind, base.source, body, tuple(headers.items()), expect, note)


# --- the strategies -------------------------------------------------------------------------

SAFE_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
ODD_TEXT = st.text(
    st.characters(codec=None, exclude_categories=())
    | st.sampled_from(["\x00", "\ud800", "\udfff", "\u202e", "\ufeff", "\U0001f600", "\u0301"]),
    min_size=1,
    max_size=40,
)
RAW_BYTES = st.binary(min_size=1, max_size=32).filter(lambda b: b"\r" not in b and b"\n" not in b)


def _huge(draw: st.DrawFn) -> str:
    """A string of 10 KB up to near the body limit, repeated from a short drawn piece."""
    piece = draw(st.text(min_size=1, max_size=8))
    size = draw(st.integers(min_value=10_000, max_value=MAX_BODY_BYTES - 50_000))
    return (piece * (size // len(piece) + 1))[:size]


def _cut(draw: st.DrawFn, length: int, low: int) -> int:
    """A position in [low, length], drawn as a share of the length: the draws then do not
    depend on how long this run's payloads are (their ids are random), so a seed gives the
    same cases in every run."""
    return low + (length - low) * draw(st.integers(0, 10_000)) // 10_000


def _wrong_value(draw: st.DrawFn, allowed: tuple[type, ...]) -> Any:
    """A JSON value of a type the field may not have (a boolean is not a number)."""
    kinds = [kind for kind in JSON_KINDS if kind not in allowed]
    return draw(JSON_KINDS[draw(st.sampled_from(kinds))])


def _bad_signature(draw: st.DrawFn, base: Base) -> Case:
    body = _dumps(base.payload)
    if draw(st.booleans()):
        body = draw(st.sampled_from([body, body[: _cut(draw, len(body), 1)], b"{}"]))
    right = hex_hmac(SECRETS[base.source], body)
    fault = draw(
        st.sampled_from(
            ["missing", "empty", "wrong hex", "other secret", "other body", "truncated"]
            + ["not hex", "raw bytes", "other secret, upper case", "sha1"]
        )
    )
    values: dict[str, bytes | None] = {
        "missing": None,
        "empty": b"",
        "wrong hex": hashlib.sha256(draw(st.binary(max_size=16)) + b"x").hexdigest().encode(),
        "other secret": hex_hmac(SECRETS[base.source] + "x", body).encode(),
        "other body": hex_hmac(SECRETS[base.source], body + b" ").encode(),
        "truncated": right[: draw(st.integers(0, 63))].encode(),
        "not hex": draw(SAFE_TEXT).encode() or b"zz",
        "raw bytes": draw(RAW_BYTES) + b"\xe9",
        "other secret, upper case": f" {hex_hmac('other', body).upper()} ".encode(),
        "sha1": hashlib.sha1(body).hexdigest().encode(),
    }
    headers = _headers(base.source, base.event)
    value = values[fault]
    if value is not None:
        headers[SIGNATURE_HEADER[base.source]] = value
    shown = f"={value[:12]!r}" if fault in ("raw bytes", "not hex") else ""
    return _case("bad signature", base, body, headers, 401, f"{fault}{shown} on {base.name}")


def _truncated(draw: st.DrawFn, base: Base) -> Case:
    whole = _dumps(base.payload)
    body = whole[: _cut(draw, len(whole) - 1, 0)]
    headers = _signed(base.source, body, _headers(base.source, base.event))
    return _case("truncated JSON", base, body, headers, None, f"{len(body)} bytes of {base.name}")


def _wrong_type(draw: st.DrawFn, base: Base) -> Case:
    path = draw(st.sampled_from(sorted(base.typed)))
    value = _wrong_value(draw, base.typed[path])
    body = _dumps(_with(base.payload, path, value))
    headers = _signed(base.source, body, _headers(base.source, base.event))
    note = f"{'.'.join(map(str, path))}={type(value).__name__} on {base.name}"
    return _case("wrong type", base, body, headers, None, note)


def _strange_text(draw: st.DrawFn, base: Base, kind: str) -> Case:
    path = draw(st.sampled_from(base.texts))
    value = _huge(draw) if kind == "huge string" else draw(ODD_TEXT)
    body = _dumps(_with(base.payload, path, value))
    headers = _signed(base.source, body, _headers(base.source, base.event))
    shown = f"{len(value)} chars" if kind == "huge string" else ascii(value)[:24]
    note = f"{'.'.join(map(str, path))}={shown} on {base.name}"
    return _case(kind, base, body, headers, None, note)


def _random_json(draw: st.DrawFn, base: Base) -> Case:
    value = draw(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["data", "id", "event", "action", "ref", "repository"])
                    | st.text(max_size=6),
                    inner,
                    max_size=4,
                )
            ),
            max_leaves=16,
        )
    )
    body = _dumps(value)
    headers = _signed(base.source, body, _headers(base.source, base.event))
    return _case("random JSON", base, body, headers, None, f"{type(value).__name__} body")


def _junk(draw: st.DrawFn, base: Base) -> Case:
    depth = draw(st.integers(min_value=100, max_value=200_000))
    shape = draw(st.sampled_from(["bytes", "deep list", "deep object", "latin-1", "literal"]))
    bodies = {
        "bytes": draw(st.binary(max_size=256)),
        "deep list": b"[" * depth + b"]" * depth,
        "deep object": b'{"data":' * depth + b"1" + b"}" * depth,
        "latin-1": json.dumps(base.payload, ensure_ascii=False).replace("a", "é").encode("latin-1"),
        "literal": draw(st.sampled_from([b"", b" ", b"null", b"NaN", b"-Infinity", b'"x"'])),
    }
    body = bodies[shape]
    headers = _signed(base.source, body, _headers(base.source, base.event))
    note = f"{shape} ({depth} deep)" if shape.startswith("deep") else shape
    return _case("junk body", base, body, headers, None, note)


def _oversize(draw: st.DrawFn, base: Base) -> Case:
    pad = "x" * (MAX_BODY_BYTES + draw(st.integers(1, 4096)))
    body = _dumps({**base.payload, "padding": pad})
    headers = _signed(base.source, body, _headers(base.source, base.event))
    return _case("oversize", base, body, headers, 413, f"{len(body)} bytes")


def _odd_headers(draw: st.DrawFn, base: Base) -> Case:
    body = _dumps(base.payload)
    plain = _headers(base.source, base.event)
    headers = dict(plain)
    event_names = [k for k in headers if "Event" in k]
    change = draw(
        st.sampled_from(
            ["no event", "odd event", "raw event", "no delivery", "huge delivery", "raw delivery"]
            + ["odd content type", "no content type", "junk header"]
        )
    )
    delivery = DELIVERY_HEADER[base.source]
    if change == "no event":
        for name in event_names:
            headers.pop(name)
    elif change in ("odd event", "raw event"):
        value = draw(SAFE_TEXT).encode() if change == "odd event" else draw(RAW_BYTES) + b"\xff"
        headers[draw(st.sampled_from(event_names))] = value
    elif change == "no delivery":
        headers.pop(delivery)
    elif change == "huge delivery":
        headers[delivery] = draw(SAFE_TEXT).encode() * 200 + b"-" * 4000
    elif change == "raw delivery":
        headers[delivery] = draw(RAW_BYTES) + b"\xc3\x28"
    elif change == "odd content type":
        headers["Content-Type"] = draw(SAFE_TEXT).encode()
    elif change == "no content type":
        headers.pop("Content-Type")
    else:
        headers[f"X-{draw(st.sampled_from(['Junk', 'Plane-Junk', 'Gitea-Junk']))}"] = draw(
            SAFE_TEXT
        ).encode()
    changed = {name: headers[name] for name in headers if headers[name] != plain.get(name)}
    shown = ", ".join(f"{name}: {value[:16]!r}" for name, value in changed.items())
    headers = _signed(base.source, body, headers)
    note = f"{change}{f' ({shown})' if shown else ''} on {base.name}"
    return _case("odd headers", base, body, headers, None, note)


# (kind, weight, needs a base that acts / that changes nothing / any)
BUILDERS = (
    ("bad signature", 24, "any"),
    ("truncated JSON", 10, "acts"),
    ("wrong type", 22, "acts"),
    ("huge string", 3, "still"),
    ("unicode", 12, "still"),
    ("random JSON", 8, "any"),
    ("junk body", 8, "any"),
    ("oversize", 1, "any"),
    ("odd headers", 12, "still"),
)


@st.composite
def cases(draw: st.DrawFn, bases: list[Base]) -> Case:
    kind, _, wants = draw(st.sampled_from([b for b in BUILDERS for _ in range(b[1])]))
    pool = [b for b in bases if wants == "any" or b.acts == (wants == "acts")]
    if kind in ("huge string", "unicode"):
        pool = [b for b in pool if b.texts]
    base = draw(st.sampled_from(pool))
    if kind in ("huge string", "unicode"):
        return _strange_text(draw, base, kind)
    build = {
        "bad signature": _bad_signature,
        "truncated JSON": _truncated,
        "wrong type": _wrong_type,
        "random JSON": _random_json,
        "junk body": _junk,
        "oversize": _oversize,
        "odd headers": _odd_headers,
    }[kind]
    return build(draw, base)


def draw_cases(bases: list[Base], count: int, seed_value: int) -> list[Case]:
    """`count` cases, the same ones for the same seed: Hypothesis's generation phase only."""
    drawn: list[Case] = []

    @seed(seed_value)
    @settings(
        max_examples=count,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases(bases))
    def collect(case: Case) -> None:
        drawn.append(case)

    collect()
    return drawn


# --- sending --------------------------------------------------------------------------------


def _with_delivery(case: Case, delivery: str) -> list[tuple[str, bytes]]:
    """The case's headers with `delivery` as its id where it keeps an empty one."""
    return [
        (name, delivery.encode() if name == DELIVERY_HEADER[case.source] and not value else value)
        for name, value in case.headers
    ]


async def _raw_post(
    url: str, path: str, headers: list[tuple[str, bytes]], body: bytes
) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte: header values no client library sends."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        head += f"Content-Length: {len(body)}\r\n"
        lines = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers)
        writer.write(head.encode() + lines + b"\r\n" + body)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def _post(
    session: aiohttp.ClientSession, url: str, case: Case, headers: list[tuple[str, bytes]]
) -> tuple[int, bytes]:
    """(status, body) of the answer to one case."""
    path = f"/webhooks/{case.source}"
    if case.raw:
        return await asyncio.wait_for(_raw_post(url, path, headers, case.body), RAW_TIMEOUT_S)
    text_headers = {name: value.decode("ascii") for name, value in headers}
    async with session.post(f"{url}{path}", data=case.body, headers=text_headers) as response:
        return response.status, await response.read()


def _refused_by_parser(status: int, answer: bytes) -> bool:
    """A 400 from aiohttp's HTTP parser (plain text), before the app ever saw the request;
    the app's own answers are JSON."""
    return status == 400 and not answer.lstrip().startswith(b"{")


async def _send_all(stack: Stack, drawn: list[Case], results: Results) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def send(index: int, case: Case) -> None:
        delivery = f"chaos-bad-{index}"
        headers = _with_delivery(case, delivery)
        results.index[delivery] = case
        async with gate:
            try:
                status, answer = await _post(stack.session, stack.url, case, headers)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as error:
                results.lost.append((case, f"{type(error).__name__}: {error}"[:120]))
                return
        results.statuses[status] += 1
        results.by_kind[case.kind] += 1
        parser = _refused_by_parser(status, answer)
        results.by_parser += parser
        if status >= 500:
            results.server_errors.append((case, status))
        elif case.expect is not None and status != case.expect and not parser:
            results.unrefused.append((case, status))

    await asyncio.gather(*(send(index, case) for index, case in enumerate(drawn)))


async def _alone(stack: Stack, results: Results) -> list[tuple[Case, int]]:
    """The 5xx cases posted again one at a time: those that still fail, fail on their own;
    the others failed only beside another delivery (one commit holds several)."""
    still = []
    for index, (case, _) in enumerate(results.server_errors):
        delivery = f"chaos-alone-{index}"
        headers = _with_delivery(case, delivery)
        results.index[delivery] = case
        try:
            status, _ = await _post(stack.session, stack.url, case, headers)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            status = 0
        if status >= 500 or status == 0:
            still.append((case, status))
    return still


@contextlib.contextmanager
def _muted() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in MUTED_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --- the state ------------------------------------------------------------------------------


@dataclass
class State:
    digests: dict[str, str]
    plane_writes: int
    telegram: int


async def _state(stack: Stack) -> State:
    await stack.settle()
    return State(
        await _digests(stack.engine.store),
        sum(call.method != "GET" for call in stack.plane.api_log),
        stack.telegram_traffic(),
    )


async def _digests(store: Store) -> dict[str, str]:
    digests = {}
    for table, order in STATE_TABLES.items():
        rows = await store.fetchall(f"SELECT * FROM {table} ORDER BY {order}")
        digest = hashlib.sha256(b"".join(repr(tuple(row)).encode() for row in rows))
        digests[table] = f"{len(rows)} rows #{digest.hexdigest()[:8]}"
    return digests


async def _board(stack: Stack, setup: SetUp) -> list[Base]:
    """One task awaiting BRD approval, and one issue on the board that has no task."""
    waiting = stack.issue("Waiting for approval")
    stack.move(waiting["id"], "In Progress")
    task = await task_of_issue(stack, waiting["id"], setup)
    await until_resting(stack, task.id, Status.AWAITING_APPROVAL, setup=setup, timeout_s=120)
    fresh = stack.issue("Never started")
    await stack.settle()
    task = await stack.engine.store.get_task(task.id)
    bases = _plane_bases(stack, stack.plane.issue(waiting["id"]), stack.plane.issue(fresh["id"]))
    return bases + _gitea_bases(task)


# --- the report -----------------------------------------------------------------------------


def _show(case: Case) -> str:
    body = case.body[:60].decode("utf-8", "backslashreplace")
    return f"{case.kind} [{case.source}] {case.note}: {body!r}{'…' if len(case.body) > 60 else ''}"


def _grouped(found: list[tuple[Case, Any]], what: str, outcome: Outcome) -> None:
    """One failure line per kind of case (source, kind, what was changed), with the answers
    it got and its smallest example."""
    groups: dict[tuple[str, str, str], list[tuple[Case, Any]]] = {}
    for case, answer in found:
        changed = re.split(r" on |=| \(| of ", case.note, maxsplit=1)[0]
        groups.setdefault((case.source, case.kind, changed), []).append((case, answer))
    for items in sorted(groups.values(), key=len, reverse=True):
        case, _ = min(items, key=lambda item: len(item[0].body))
        answers = "/".join(str(a) for a in sorted({answer for _, answer in items}))
        outcome.check(False, f"{len(items)}× {answers} {what}: {_show(case)}")


async def _acted(stack: Stack, results: Results, after_id: int) -> list[str]:
    """The deliveries recorded since `after_id` whose processing acted, named by their case."""
    rows = await stack.engine.store.fetchall(
        "SELECT delivery_id, outcome FROM webhook_deliveries WHERE id > ? ORDER BY id", (after_id,)
    )
    acted = []
    for row in rows:
        outcome = str(row["outcome"] or "")
        if outcome in ACTING or outcome.startswith("not started"):
            case = results.index.get(row["delivery_id"] or "")
            acted.append(f"{outcome!r} from {_show(case) if case else row['delivery_id']}")
    return acted


def _report_answers(drawn: list[Case], results: Results, alone: list, outcome: Outcome) -> None:
    outcome.figure(
        f"{len(drawn)} cases ({sum(c.source == 'plane' for c in drawn)} Plane,"
        f" {sum(c.source == 'gitea' for c in drawn)} Gitea, {sum(c.raw for c in drawn)} raw)"
    )
    outcome.figure(", ".join(f"{kind} {n}" for kind, n in results.by_kind.most_common()))
    outcome.figure(
        "answers " + ", ".join(f"{status}×{n}" for status, n in sorted(results.statuses.items()))
    )
    outcome.figure(
        f"5xx {len(results.server_errors)} ({len(alone)} again when posted alone),"
        f" lost {len(results.lost)}"
    )
    alone_ids = {id(case) for case, _ in alone}
    _grouped(alone, "on its own", outcome)
    beside = [(c, s) for c, s in results.server_errors if id(c) not in alone_ids]
    _grouped(beside, "only beside other deliveries (alone: below 500)", outcome)
    for case, error in results.lost[:3]:
        outcome.check(False, f"no answer ({error}): {_show(case)}")
    signatures = sum(case.kind == "bad signature" for case in drawn)
    failed = [c for c, _ in results.unrefused + results.server_errors] + [
        c for c, _ in results.lost
    ]
    refused = signatures - sum(c.kind == "bad signature" for c in failed)
    outcome.figure(
        f"bad signatures {refused}/{signatures} refused"
        f" ({results.by_parser} of all answers a 400 from the HTTP parser)"
    )
    _grouped(results.unrefused, "where another answer was due", outcome)


def _report_state(before: State, after: State, outcome: Outcome) -> None:
    changed = [t for t in STATE_TABLES if after.digests[t] != before.digests[t]]
    detail = ", ".join(f"{t} {before.digests[t]} → {after.digests[t]}" for t in changed)
    outcome.figure(
        f"state changes {len(changed)} tables{f' ({detail})' if changed else ''},"
        f" Plane writes +{after.plane_writes - before.plane_writes},"
        f" Telegram calls +{after.telegram - before.telegram}"
    )
    outcome.check(not changed, f"bad input changed {', '.join(changed)}")
    outcome.check(after.plane_writes == before.plane_writes, "bad input wrote to Plane")
    outcome.check(after.telegram == before.telegram, "bad input made Telegram calls")


async def _report_recorded(stack: Stack, after_id: int, outcome: Outcome) -> None:
    rows = await stack.engine.store.fetchall(
        "SELECT outcome, COUNT(*) AS n FROM webhook_deliveries WHERE id > ? GROUP BY outcome",
        (after_id,),
    )
    tally = {str(row["outcome"]): row["n"] for row in rows}
    unprocessed = tally.pop("None", 0)
    outcome.figure(
        f"recorded {sum(tally.values()) + unprocessed} (processing errors"
        f" {tally.get('error', 0)}, unprocessed {unprocessed})"
    )


async def _last_delivery(store: Store) -> int:
    row = await store.fetchone("SELECT COALESCE(MAX(id), 0) AS n FROM webhook_deliveries")
    return int(row["n"])


async def run_bad_input(root: Path, *, count: int, seed_value: int) -> list[Outcome]:
    outcome = Outcome("bad-input")
    started = time.monotonic()
    with agent_env(root / "agent-state"):
        stack = await Stack.open(root, ci_state=None)
        try:
            setup = SetUp()
            bases = await _board(stack, setup)
            drawn = await asyncio.to_thread(draw_cases, bases, count, seed_value)
            before = await _state(stack)
            last_id = await _last_delivery(stack.engine.store)
            results = Results()
            with _muted():
                await bounded(_send_all(stack, drawn, results), f"{count} posts", 900)
                await stack.settle()
                alone = await bounded(_alone(stack, results), "posting 5xx cases alone", 300)
            after = await _state(stack)
            _report_answers(drawn, results, alone, outcome)
            _report_state(before, after, outcome)
            for line in (await _acted(stack, results, last_id))[:5]:
                outcome.check(False, f"acted: {line}")
            await _report_recorded(stack, last_id, outcome)
            if setup.repairs:
                outcome.figure(setup.figure())
        finally:
            await stack.close()
    outcome.seconds = time.monotonic() - started
    return [outcome]


async def run(root: Path, *, seed: int, quick: bool) -> list[Outcome]:
    """10,000 generated cases (500 quick), half to each endpoint on average."""
    return await run_bad_input(root, count=500 if quick else 10_000, seed_value=seed)
