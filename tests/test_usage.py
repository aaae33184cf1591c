import json
import logging

import pytest

from engine.usage import Usage, parse_result, short_model_name

# The example of /work/shared/reference/claude-code.md, keys and all.
EXAMPLE = {
    "type": "result",
    "subtype": "success",
    "is_error": False,
    "result": "final text of the agent",
    "session_id": "9f1c",
    "num_turns": 6,
    "duration_ms": 81655,
    "duration_api_ms": 70011,
    "total_cost_usd": 0.31,
    "usage": {
        "input_tokens": 10,
        "cache_creation_input_tokens": 10238,
        "cache_read_input_tokens": 22383,
        "output_tokens": 41,
        "output_tokens_details": {"thinking_tokens": 34},
        "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
        "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 10238},
    },
    "modelUsage": {
        "claude-opus-4-7": {
            "inputTokens": 10,
            "outputTokens": 41,
            "cacheReadInputTokens": 22383,
            "cacheCreationInputTokens": 10238,
            "costUSD": 0.20,
            "contextWindow": 200000,
            "maxOutputTokens": 32000,
        },
        "claude-haiku-4-5": {
            "inputTokens": 500,
            "outputTokens": 900,
            "cacheReadInputTokens": 1000,
            "cacheCreationInputTokens": 0,
            "costUSD": 0.11,
        },
    },
    "permission_denials": [],
    "stop_reason": "end_turn",
    "uuid": "abc",
}

NULLS = Usage()


def result(**overrides: object) -> dict:
    return {**EXAMPLE, **overrides}


def with_usage(**overrides: object) -> str:
    return json.dumps(result(usage={**EXAMPLE["usage"], **overrides}))


def test_full_example_from_the_reference():
    usage = parse_result(json.dumps(EXAMPLE))
    assert usage.result_found is True
    assert (usage.input_tokens, usage.output_tokens) == (10, 41)
    assert (usage.cache_read_tokens, usage.cache_creation_tokens) == (22383, 10238)
    assert usage.cost_usd == pytest.approx(0.31)
    assert usage.model == "opus-4-7"
    assert usage.is_error is False
    assert usage.subtype == "success"
    assert usage.full_input == 10 + 22383 + 10238
    assert usage.cached_input == 22383 + 10238
    assert usage.model_usage["claude-haiku-4-5"] == {
        "input_tokens": 500,
        "output_tokens": 900,
        "cache_read_tokens": 1000,
        "cache_creation_tokens": 0,
        "cost_usd": 0.11,
    }
    assert set(usage.model_usage) == {"claude-opus-4-7", "claude-haiku-4-5"}


@pytest.mark.parametrize(
    "model_usage, expected",
    [
        ({"claude-haiku-4-5": {"costUSD": 0.05}, "claude-opus-4-7": {"costUSD": 0.26}}, "opus-4-7"),
        (
            {"claude-opus-4-7": {"costUSD": 0.01}, "claude-sonnet-4-5-20250929": {"costUSD": 0.3}},
            "sonnet-4-5",
        ),
        ({"claude-opus-4-7[1m]": {"costUSD": 0.31}}, "opus-4-7"),
        ({"claude-opus-4-7": {"costUSD": "a lot"}, "claude-haiku-4-5": {}}, "opus-4-7"),
        ({}, None),
        ("not a dict", None),
    ],
)
def test_main_model_is_the_most_expensive_one(model_usage, expected):
    assert parse_result(json.dumps(result(modelUsage=model_usage))).model == expected


@pytest.mark.parametrize(
    "name, short",
    [
        ("claude-opus-4-7", "opus-4-7"),
        ("claude-haiku-4-5-20251001", "haiku-4-5"),
        ("claude-sonnet-4-5-20250929[1m]", "sonnet-4-5"),
        ("claude-opus-4-7[1m]", "opus-4-7"),
        ("opus", "opus"),
        ("", ""),
    ],
)
def test_short_model_name(name, short):
    assert short_model_name(name) == short


@pytest.mark.parametrize(
    "stdout",
    [
        "Warning: update available\n" + json.dumps(EXAMPLE),
        "not json {\n{broken\n" + json.dumps(EXAMPLE) + "\n\n",
        "Warning: noisy CLI\n" + json.dumps(EXAMPLE, indent=2),
        "prefix on the same line " + json.dumps(EXAMPLE),
        json.dumps({"type": "system", "subtype": "init"}) + "\n" + json.dumps(EXAMPLE),
        json.dumps(EXAMPLE, indent=2),
    ],
    ids=["warning-line", "broken-lines", "pretty", "same-line", "stream-json", "pretty-only"],
)
def test_result_is_found_after_noise(stdout):
    usage = parse_result(stdout)
    assert usage.result_found is True
    assert usage.output_tokens == 41
    assert usage.model == "opus-4-7"


def test_the_last_result_wins():
    first = json.dumps(result(total_cost_usd=0.99, modelUsage={}))
    assert parse_result(first + "\n" + json.dumps(EXAMPLE)).cost_usd == pytest.approx(0.31)


@pytest.mark.parametrize(
    "stdout",
    [
        "",
        "   \n\t",
        "garbage, no json at all",
        "{not json",
        "[1, 2, 3]",
        json.dumps([EXAMPLE]),
        json.dumps({"type": "assistant", "usage": EXAMPLE["usage"]}),
        json.dumps({**EXAMPLE, "type": "RESULT"}),
        "null",
        "42",
        '"result"',
    ],
)
def test_garbage_gives_nulls(stdout):
    assert parse_result(stdout) == NULLS


def test_not_even_a_string_gives_nulls():
    assert parse_result(None) == NULLS  # type: ignore[arg-type]
    assert parse_result(b"{}") == NULLS  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", [-1, True, False, "10", 1.5, None, [], {}], ids=lambda value: repr(value)
)
def test_bad_token_counts_are_null(bad):
    usage = parse_result(with_usage(input_tokens=bad, output_tokens=bad))
    assert usage.result_found is True
    assert usage.input_tokens is None
    assert usage.output_tokens is None
    assert usage.cache_read_tokens == 22383


@pytest.mark.parametrize("bad", [-0.5, True, "0.31", None, [], float("nan"), float("inf")])
def test_bad_cost_is_null(bad):
    assert parse_result(json.dumps(result(total_cost_usd=bad))).cost_usd is None


@pytest.mark.parametrize("cost, expected", [(0, 0.0), (2, 2.0), (0.125, 0.125)])
def test_int_and_float_costs_are_floats(cost, expected):
    usage = parse_result(json.dumps(result(total_cost_usd=cost, modelUsage={})))
    assert usage.cost_usd == expected
    assert isinstance(usage.cost_usd, float)


@pytest.mark.parametrize(
    "fields",
    [
        {"usage": "lots"},
        {"usage": None},
        {"modelUsage": ["claude-opus-4-7"]},
        {"modelUsage": {"claude-opus-4-7": "expensive"}},
        {"is_error": "false", "subtype": 7},
    ],
)
def test_wrong_types_never_raise(fields):
    usage = parse_result(json.dumps(result(**fields)))
    assert usage.result_found is True


def test_wrong_types_become_nulls():
    usage = parse_result(json.dumps(result(usage="lots", is_error="no", subtype=3, modelUsage=1)))
    assert usage.input_tokens is None
    assert usage.full_input is None
    assert usage.is_error is None
    assert usage.subtype is None
    assert usage.model_usage == {}
    assert usage.model is None


def test_minimal_result_object():
    usage = parse_result('{"type": "result"}')
    assert usage == Usage(result_found=True)


@pytest.mark.parametrize(
    "is_error, subtype",
    [(True, "error_during_execution"), (False, "error_max_turns"), (True, "success")],
)
def test_is_error_and_subtype_are_reported(is_error, subtype):
    usage = parse_result(json.dumps(result(is_error=is_error, subtype=subtype)))
    assert (usage.is_error, usage.subtype) == (is_error, subtype)


@pytest.mark.parametrize(
    "tokens, full, cached",
    [
        ({"input_tokens": 1, "cache_read_tokens": 2, "cache_creation_tokens": 4}, 7, 6),
        ({"input_tokens": 5}, 5, None),
        ({"cache_read_tokens": 3}, 3, 3),
        ({"cache_creation_tokens": 0}, 0, 0),
        ({}, None, None),
    ],
)
def test_full_and_cached_input(tokens, full, cached):
    usage = Usage(**tokens)
    assert usage.full_input == full
    assert usage.cached_input == cached


def test_unknown_keys_are_ignored():
    noisy = result(
        brand_new_key={"nested": [1, 2]},
        usage={**EXAMPLE["usage"], "future_tokens": 5},
        modelUsage={"claude-opus-4-7": {"costUSD": 0.31, "webSearchRequests": 2, "x": "y"}},
    )
    usage = parse_result(json.dumps(noisy))
    assert usage.input_tokens == 10
    assert usage.model_usage["claude-opus-4-7"]["cost_usd"] == 0.31
    assert "webSearchRequests" not in usage.model_usage["claude-opus-4-7"]


def test_cost_mismatch_is_logged_not_raised(caplog):
    mismatch = result(total_cost_usd=1.0)  # the models add up to 0.31
    with caplog.at_level(logging.WARNING, logger="engine.usage"):
        usage = parse_result(json.dumps(mismatch))
    assert usage.cost_usd == 1.0
    assert any("total_cost_usd" in record.getMessage() for record in caplog.records)


def test_matching_costs_log_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="engine.usage"):
        parse_result(json.dumps(EXAMPLE))
    assert not caplog.records


def test_huge_numbers_do_not_raise():
    usage = parse_result('{"type": "result", "total_cost_usd": 1' + "0" * 400 + "}")
    assert usage.result_found is True
    assert usage.cost_usd is None


def test_type_key_after_nested_objects_is_found_in_noise():
    reordered = {key: EXAMPLE[key] for key in ("usage", "modelUsage", "total_cost_usd")}
    pretty = json.dumps({**reordered, "type": "result"}, indent=2)
    usage = parse_result("noise {\n" + pretty)
    assert usage.result_found is True
    assert usage.cache_read_tokens == 22383


def test_large_log_with_many_braces_still_finds_the_result():
    noise = 'int main() { if (x) { y = {1, 2}; } " unterminated {\n' * 20_000
    events = json.dumps({"type": "assistant", "message": {"content": [{"type": "text"}]}})
    stdout = noise + (events + "\n") * 2_000 + "Warning: late\n" + json.dumps(EXAMPLE, indent=2)
    assert parse_result(stdout).output_tokens == 41
