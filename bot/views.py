"""The texts of /queue and /task, rendered from the store and kept under Telegram's limit."""

from __future__ import annotations

import re
from collections.abc import Callable

from markupsafe import Markup

from bot.cards import CARD_TEXT_BUDGET, TELEGRAM_TEXT_LIMIT, CardRenderer, clock
from bot.texts import Texts
from engine.reconciler import TICK_SETTING
from engine.stages import FINISHED, STAGES
from engine.store import Store, Task, now

TASK_EVENTS_SHOWN = 30
CUT_MARK = "\n…"
# the markup of a line cut in its middle: every tag (its partner may be past the cut), and
# an entity cut in half
PARTIAL_MARKUP = re.compile(r"<[^>]*>?|&[#\w]*$")


def cut(text: str, limit: int) -> str:
    """`text` in at most `limit` characters, ending with "…" when it was longer.

    The templates open and close every tag on one line, so cutting at a line break never
    leaves a tag open (Telegram would refuse the whole message). A single line longer than
    the limit loses its markup instead.
    """
    if len(text) <= limit:
        return text
    budget = limit - len(CUT_MARK)
    end = text.rfind("\n", 0, budget + 1)
    if end > 0:
        return text[:end] + CUT_MARK
    return PARTIAL_MARKUP.sub("", text[:budget]) + CUT_MARK


def fit(render: Callable[[int], str], total: int, limit: int = TELEGRAM_TEXT_LIMIT) -> str:
    """Render with as many of `total` items as fit under `limit`; the rest become "+N more"."""
    shown = total
    text = render(shown)
    while len(text) > limit and shown > 0:
        shown = max(0, shown - max(1, shown // 4))
        text = render(shown)
    return cut(text, limit)


async def queue_text(store: Store, texts: Texts) -> str:
    tasks = [t for t in await store.list_tasks() if t.status not in FINISHED]
    order = {spec.stage.value: i for i, spec in enumerate(STAGES)}
    tasks.sort(key=lambda t: (order[t.stage], t.id))
    jobs = await store.active_jobs()
    tick = await store.get_setting(TICK_SETTING)
    at = now()

    def render(shown: int) -> str:
        groups: dict[str, list[Task]] = {}
        for task in tasks[:shown]:
            groups.setdefault(task.stage, []).append(task)
        return texts.render(
            "telegram/queue.html.j2",
            groups=groups,
            total=len(tasks),
            more=len(tasks) - shown,
            jobs=jobs[:20],
            more_jobs=max(0, len(jobs) - 20),
            tick=tick,
            now=at,
            clock=clock,
        )

    return fit(render, len(tasks))


async def task_text(
    store: Store, renderer: CardRenderer, texts: Texts, task: Task, mode: str
) -> str:
    card = await renderer.render(task, mode)
    events = await store.events(task.id)
    runs = await store.agent_runs(task.id)

    def render(shown: int) -> str:
        return texts.render(
            "telegram/task.html.j2",
            card=Markup(cut(card.text, CARD_TEXT_BUDGET)),  # the card's own HTML, already escaped
            events=events[-shown:] if shown else [],
            more_events=len(events) - shown,
            runs=runs[-15:],
            clock=clock,
        )

    return fit(render, min(len(events), TASK_EVENTS_SHOWN))
