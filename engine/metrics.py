"""In-process counters for /metrics, beside the gauges read from the store.

Counters start at zero with the process, as Prometheus counters do; anything that
must survive a restart is read from the store instead.
"""

from __future__ import annotations

from collections import defaultdict

Labels = tuple[tuple[str, str], ...]


class Counters:
    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._help: dict[str, str] = {}

    def describe(self, name: str, help_text: str) -> None:
        self._help[name] = help_text

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._values[name]
        series[key] = series.get(key, 0.0) + amount

    def value(self, name: str, **labels: str) -> float:
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines: list[str] = []
        for name in sorted(self._values):
            lines.append(f"# HELP {name} {self._help.get(name, name)}")
            lines.append(f"# TYPE {name} counter")
            for labels, value in sorted(self._values[name].items()):
                lines.append(f"{name}{format_labels(dict(labels))} {value:g}")
        return lines


def format_labels(labels: dict[str, object]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{key}="{str(value).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for key, value in labels.items()
    )
    return "{" + inner + "}"


COUNTERS = Counters()
COUNTERS.describe("conveyor_telegram_calls_total", "Telegram Bot API calls by method and outcome.")
COUNTERS.describe("conveyor_webhooks_received_total", "Webhook requests by source and answer.")
COUNTERS.describe("conveyor_reconciler_ticks_total", "Reconciler ticks.")
COUNTERS.describe(
    "conveyor_reconciler_tick_seconds_total", "Time spent in reconciler ticks, in seconds."
)
COUNTERS.describe(
    "conveyor_reconciler_examined_total", "Idle active tasks the reconciler examined."
)
COUNTERS.describe("conveyor_reconciler_started_total", "Tasks the reconciler started.")
COUNTERS.describe(
    "conveyor_reconciler_verdicts_total", "BRD verdicts the reconciler replayed from the board."
)
COUNTERS.describe("conveyor_reconciler_unblocked_total", "Tasks the reconciler moved.")
COUNTERS.describe("conveyor_reconciler_skipped_total", "Tasks the reconciler skipped, by guard.")
COUNTERS.describe("conveyor_reconciler_errors_total", "Errors during reconciler ticks.")
