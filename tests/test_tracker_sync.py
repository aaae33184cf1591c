"""The outbound sync against the sandbox Plane and Gitea: where the issue goes, what the
agents' comments say, and how an outage of Plane is lived through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import fields

import pytest

from engine.links import forge_branch_url, forge_file_url, pull_request_url
from engine.stages import Status
from engine.store import Task
from tests.conftest import HANG_GUARD_S
from tests.test_webhooks import PUBLIC_FORGE, Board, open_board

SYNC = "SELECT failures, last_error FROM tracker_sync WHERE task_id = ?"
TASK_LINKED = {"project": "ORCH", "branch": "orch-001-x", "pr_number": 7}


@pytest.fixture
async def board(tmp_path, make_settings, notifier, agent_env) -> AsyncIterator[Board]:
    opened, close = await open_board(tmp_path, make_settings, notifier, ci_state="success")
    try:
        yield opened
    finally:
        await close()


async def run_to_done(board: Board) -> tuple[dict, Task]:
    issue, task = await board.awaiting_approval()
    board.move(issue["id"], "Approved")
    task = await board.until(task.id, Status.DONE)
    await board.engine.tracker.idle()
    return issue, task


def comment_by(board: Board, issue_id: str, label: str) -> dict:
    (comment,) = [
        c
        for c in board.plane.comments(issue_id)
        if c["comment_html"].startswith(f"<p><strong>{label}<")
    ]
    return comment


# --- where the issue goes -----------------------------------------------------------------------


async def test_a_renamed_done_state_is_where_a_finished_task_ends(board: Board) -> None:
    board.plane.rename_state(board.project_id, "Done", "Shipped")

    issue, task = await run_to_done(board)

    await board.board_state(issue["id"], "Shipped")
    assert "is done" in board.plane.comments(issue["id"])[-1]["comment_html"]


async def test_a_renamed_in_progress_state_is_where_analysis_shows(board: Board) -> None:
    board.plane.rename_state(board.project_id, "In Progress", "Doing")
    issue = board.issue()
    board.move(issue["id"], "Doing")
    task = await board.task_of(issue["id"])
    await board.until(task.id, Status.AWAITING_APPROVAL)
    await board.board_state(issue["id"], "In Review")
    board.move(issue["id"], "Rejected")  # the analyst works again: back in the In Progress column

    await board.board_state(issue["id"], "Doing")
    await board.until(task.id, Status.AWAITING_APPROVAL)


# --- what the comments say ----------------------------------------------------------------------


async def test_each_agent_comments_as_its_bot_with_its_figures_and_links(board: Board) -> None:
    issue, task = await run_to_done(board)
    runs = {run.role: run for run in await board.engine.store.agent_runs(task.id)}

    developer = comment_by(board, issue["id"], "Developer")
    text = developer["comment_html"]
    assert board.plane.user(developer["actor"])["display_name"] == "developer bot"
    assert "Developer</strong> finished · 102k in / 6.0k out · $0.87" in text
    assert runs["developer"].full_input == 102_040 and runs["developer"].output_tokens == 6_000
    pr_url = f"{PUBLIC_FORGE}/team/app/pulls/{task.pr_number}"
    assert f'<a href="{pr_url}">PR #{task.pr_number}</a>' in text

    analyst = comment_by(board, issue["id"], "Analyst")
    assert analyst["actor"] == board.plane.main_user_id  # no analyst bot: the shared account
    brd = f"{PUBLIC_FORGE}/team/app/src/branch/{task.branch}/docs/work-items/ORCH-001/01-brd.md"
    assert f'<a href="{brd}">01-brd.md</a>' in analyst["comment_html"]
    assert "PR #" not in analyst["comment_html"]
    # each comment once, under Conveyor's external id
    sources = {(c["external_source"], c["external_id"]) for c in board.plane.comments(issue["id"])}
    assert len(sources) == len(board.plane.comments(issue["id"])) == len(runs) + 1


async def test_without_a_pull_request_the_developer_links_the_branch(
    tmp_path, make_settings, notifier, agent_env
) -> None:
    board, close = await open_board(tmp_path, make_settings, notifier, "success", forge=False)
    try:
        issue, task = await run_to_done(board)
        text = comment_by(board, issue["id"], "Developer")["comment_html"]
    finally:
        await close()

    assert task.pr_number is None
    branch = f"{PUBLIC_FORGE}/team/app/src/branch/{task.branch}"
    assert f'Branch <a href="{branch}"><code>{task.branch}</code></a>' in text


@pytest.mark.parametrize(
    "base", [None, "", "http://localhost:3000", "http://127.0.0.1:3000/", "http://[::1]/"]
)
def test_links_to_a_loopback_or_empty_forge_are_left_out(make_settings, base) -> None:
    settings = make_settings(
        projects=[{"key": "ORCH", "remote": "r", "repo": "team/app"}], gitea_public_url=base
    )
    task = Task(**dict.fromkeys(f.name for f in fields(Task)) | TASK_LINKED)
    assert forge_branch_url(settings, task) is None  # with a public URL it is there:
    assert forge_branch_url(settings.model_copy(update={"gitea_public_url": PUBLIC_FORGE}), task)
    assert forge_file_url(settings, task, "docs/x.md") is None
    assert pull_request_url(settings, task) is None


# --- an outage of Plane -------------------------------------------------------------------------


async def test_a_plane_outage_leaves_the_pipeline_running_and_the_sync_catches_up(
    tmp_path, make_settings, notifier, agent_env
) -> None:
    board, close = await open_board(
        tmp_path,
        make_settings,
        notifier,
        "success",
        plane_timeout_s=0.5,
        tracker_retry_base_s=0.2,
        tracker_retry_max_s=1.0,
    )
    try:
        issue, task = await board.awaiting_approval()
        board.plane.api_fault(500)  # until cleared
        assert (await board.engine.pipeline.approve(task.id, actor="@alice (42)")).changed
        await sync_failing(board, task.id, "HTTP 500")
        board.plane.api_fault("hang")
        await sync_failing(board, task.id, "did not answer")
        task = await board.until(task.id, Status.DONE)  # the pipeline went on regardless
        assert board.plane.hung > 0 and board.plane.state_name(issue["id"]) != "Done"

        board.plane.api_fault(None)  # Plane is back; the sync retries on its own backoff
        await board.board_state(issue["id"], "Done")
        await summary_posted(board, issue["id"])
        await board.engine.tracker.idle()
        row = await board.engine.store.fetchone(SYNC, (task.id,))
        assert (row["failures"], row["last_error"]) == (0, None)
        runs = await board.engine.store.agent_runs(task.id)
        comments = board.plane.comments(issue["id"])
        assert len(comments) == len(runs) + 1  # every run once, and the summary
    finally:
        await close()


async def sync_failing(board: Board, task_id: int, error: str) -> None:
    """Wait until the sync has failed at least twice in a row with `error`."""

    async def loop() -> None:
        while True:
            row = await board.engine.store.fetchone(SYNC, (task_id,))
            if row and row["failures"] >= 2 and error in (row["last_error"] or ""):
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), HANG_GUARD_S)


async def summary_posted(board: Board, issue_id: str) -> None:
    async def loop() -> None:
        while not any("is done" in c["comment_html"] for c in board.plane.comments(issue_id)):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), HANG_GUARD_S)
    summary = board.plane.comments(issue_id)[-1]["comment_html"]
    assert "ORCH-001</strong> is done ·" in summary and "$" in summary
