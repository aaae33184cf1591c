"""Reading the usage out of Claude Code's result JSON (`claude -p --output-format json`).

The parser never raises: an agent's stdout is untrusted text, and a run whose usage cannot
be read is still a run (its numbers are simply unknown, stored as NULLs).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# The brace scan is the slow path; a result object sits at the very end of stdout.
_BRACE_SCAN_CHARS = 2_000_000
_RESULT_TYPE = re.compile(r'"type"\s*:\s*"result"')
_MAX_MARKERS = 5
_MAX_BRACES_PER_MARKER = 50
_COST_TOLERANCE_USD = 0.01
_INVALID = object()

_USAGE_KEYS = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_read_tokens": "cache_read_input_tokens",
    "cache_creation_tokens": "cache_creation_input_tokens",
}
_MODEL_USAGE_KEYS = {
    "input_tokens": "inputTokens",
    "output_tokens": "outputTokens",
    "cache_read_tokens": "cacheReadInputTokens",
    "cache_creation_tokens": "cacheCreationInputTokens",
}


@dataclass(frozen=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    cost_usd: float | None = None
    model: str | None = None
    model_usage: dict[str, dict] = field(default_factory=dict)
    is_error: bool | None = None
    subtype: str | None = None
    result_found: bool = False

    @property
    def full_input(self) -> int | None:
        """What the run really read: `input_tokens` alone is tiny when the cache works."""
        return _sum_known(self.input_tokens, self.cache_read_tokens, self.cache_creation_tokens)

    @property
    def cached_input(self) -> int | None:
        return _sum_known(self.cache_read_tokens, self.cache_creation_tokens)


def parse_result(stdout: str) -> Usage:
    try:
        result = _find_result(stdout)
        return _usage_from(result) if result is not None else Usage()
    except Exception:  # the parser's promise is "never raises"; a bug here must not kill a run
        log.exception("could not parse the agent's result JSON")
        return Usage()


def _find_result(stdout: str) -> dict[str, Any] | None:
    """The last `type: result` object on stdout, or None."""
    if not isinstance(stdout, str) or not stdout.strip():
        return None
    text = stdout.strip()
    whole = _loads(text)
    if whole is not _INVALID:  # stdout is exactly one JSON value: it is the answer or nothing
        return _as_result(whole)
    return _last_lines(text) or _last_braces(text)


def short_model_name(name: str) -> str:
    """Drop the vendor prefix, a date suffix and "[1m]"-style tags: claude-opus-4-7 -> opus-4-7."""
    short = name.strip()
    while True:
        trimmed = re.sub(r"\[[^\[\]]*\]$", "", short).rstrip()
        if trimmed == short:
            break
        short = trimmed
    short = re.sub(r"-\d{8}$", "", short)
    return short.removeprefix("claude-")


def _last_lines(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            found = _as_result(_loads(line))
            if found is not None:
                return found
    return None


def _last_braces(text: str) -> dict[str, Any] | None:
    """Find an object that shares its line with noise or spans lines (pretty-printed).

    Only braces just before a `"type": "result"` are tried, a bounded number of them:
    decoding at every brace of a large log is quadratic.
    """
    tail = text[-_BRACE_SCAN_CHARS:]
    markers = list(_RESULT_TYPE.finditer(tail))[-_MAX_MARKERS:]
    for marker in reversed(markers):
        pos = tail.rfind("{", 0, marker.start())
        for _ in range(_MAX_BRACES_PER_MARKER):
            if pos < 0:
                break
            found = _as_result(_decode_prefix(tail[pos:]))
            if found is not None:
                return found
            pos = tail.rfind("{", 0, pos)
    return None


def _decode_prefix(text: str) -> Any:
    try:
        return json.JSONDecoder().raw_decode(text)[0]
    except (ValueError, RecursionError):
        return _INVALID


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _INVALID


def _as_result(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict) and value.get("type") == "result":
        return value
    return None


def _usage_from(result: dict[str, Any]) -> Usage:
    tokens = result.get("usage")
    tokens = tokens if isinstance(tokens, dict) else {}
    model_usage = _model_usage(result.get("modelUsage"))
    cost = _cost(result.get("total_cost_usd"))
    _check_cost(cost, model_usage)
    is_error = result.get("is_error")
    subtype = result.get("subtype")
    return Usage(
        **{ours: _count(tokens.get(theirs)) for ours, theirs in _USAGE_KEYS.items()},
        cost_usd=cost,
        model=_main_model(model_usage),
        model_usage=model_usage,
        is_error=is_error if isinstance(is_error, bool) else None,
        subtype=subtype if isinstance(subtype, str) else None,
        result_found=True,
    )


def _model_usage(raw: Any) -> dict[str, dict]:
    if not isinstance(raw, dict):
        return {}
    models: dict[str, dict] = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            continue
        per_model: dict[str, Any] = {
            ours: _count(entry.get(theirs)) for ours, theirs in _MODEL_USAGE_KEYS.items()
        }
        per_model["cost_usd"] = _cost(entry.get("costUSD"))
        models[name] = per_model
    return models


def _main_model(model_usage: dict[str, dict]) -> str | None:
    """The model with the largest cost; the first listed one wins ties and unknown costs."""
    best: str | None = None
    best_cost = -1.0
    for name, entry in model_usage.items():
        cost = entry["cost_usd"] if entry["cost_usd"] is not None else -0.5
        if cost > best_cost:
            best, best_cost = name, cost
    return short_model_name(best) if best is not None else None


def _check_cost(total: float | None, model_usage: dict[str, dict]) -> None:
    costs = [entry["cost_usd"] for entry in model_usage.values() if entry["cost_usd"] is not None]
    if total is None or not costs:
        return
    if abs(sum(costs) - total) > _COST_TOLERANCE_USD:
        log.warning(
            "agent result: modelUsage costs add up to %.6f USD but total_cost_usd is %.6f USD",
            sum(costs),
            total,
        )


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _cost(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        cost = float(value)
    except OverflowError:
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None


def _sum_known(*values: int | None) -> int | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None
