"""engine.git against real git: a bare repository in tmp_path plays the remote."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from engine.git import (
    GitError,
    GitResult,
    GitWorkspace,
    branch_name,
    changed_files,
    redact,
    run_git,
    slugify,
)

PROJECT = "ORCH"
WORK_ITEM = "ORCH-1"
BRANCH = branch_name(WORK_ITEM, "Add login page")


async def git(*args: str, cwd: Path | None = None) -> str:
    res = await run_git(*args, cwd=cwd)
    assert res.ok, res.err
    return res.out.strip()


async def commit_file(repo: Path, name: str, text: str, message: str) -> str:
    (repo / name).write_text(text, encoding="utf-8")
    await git("add", "-A", cwd=repo)
    await git("commit", "-q", "-m", message, cwd=repo)
    return await git("rev-parse", "HEAD", cwd=repo)


async def push_to_main(remote: Path, clone: Path, name: str, text: str) -> str:
    """Another engineer's change lands on main."""
    await git("clone", "-q", "-b", "main", str(remote), str(clone))
    sha = await commit_file(clone, name, text, f"change {name}")
    await git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=clone)
    return sha


async def remote_rev(remote: Path, ref: str) -> str:
    return await git("--git-dir", str(remote), "rev-parse", ref)


@pytest.fixture
async def remote(tmp_path: Path) -> Path:
    bare = tmp_path / "remote.git"
    seed = tmp_path / "seed"
    await git("init", "-q", "--bare", "-b", "main", str(bare))
    await git("init", "-q", "-b", "main", str(seed))
    await commit_file(seed, "README.md", "line one\nline two\n", "initial")
    await git("push", "-q", str(bare), "HEAD:refs/heads/main", cwd=seed)
    return bare


@pytest.fixture
def ws(tmp_path: Path) -> GitWorkspace:
    return GitWorkspace(tmp_path / "work")


async def task_worktree(ws: GitWorkspace, remote: Path) -> Path:
    return await ws.ensure_worktree(PROJECT, str(remote), "main", BRANCH, WORK_ITEM)


@pytest.mark.parametrize(
    ("title", "slug"),
    [
        ("Add login page", "add-login-page"),
        ("Fix: crash on save!!! (v2.0)", "fix-crash-on-save-v2-0"),
        ("  --Hello__World--  ", "hello-world"),
        ("; rm -rf / ёжик", "rm-rf"),
        ("$(reboot) `id` && echo", "reboot-id-echo"),
        ("Ёжик в тумане", "untitled"),
        ("", "untitled"),
        ("---", "untitled"),
        ("KELVIN \u212a sign", "kelvin-sign"),
        ("a" * 39 + " bcd", "a" * 39),
        ("word " * 20, "word-word-word-word-word-word-word-word"),
    ],
)
def test_slugify(title: str, slug: str) -> None:
    assert slugify(title) == slug
    assert len(slugify(title)) <= 40


def test_slugify_limit() -> None:
    assert slugify("abc def", limit=4) == "abc"


def test_branch_name() -> None:
    assert branch_name("ORCH-12", "Add login page") == "feature/orch-12-add-login-page"
    assert branch_name("ORCH-3", "ёжик") == "feature/orch-3-untitled"


def test_redact() -> None:
    text = "fatal: https://bot:t0k@n@git.example.com/x.git and ssh://git@host/y"
    assert redact(text) == "fatal: https://***@git.example.com/x.git and ssh://***@host/y"


async def test_worktree_created_from_main_and_reused(ws: GitWorkspace, remote: Path) -> None:
    wt = await task_worktree(ws, remote)

    assert wt == ws.worktree_dir(PROJECT, WORK_ITEM)
    assert ws.repo_dir(PROJECT).is_dir()
    assert await git("symbolic-ref", "--short", "HEAD", cwd=wt) == BRANCH
    assert await ws.head_sha(wt) == await remote_rev(remote, "main")
    assert (wt / "README.md").read_text() == "line one\nline two\n"
    assert await git("rev-parse", "origin/main", cwd=wt) == await remote_rev(remote, "main")

    (wt / "notes.txt").write_text("work in progress")
    again = await task_worktree(ws, remote)
    assert again == wt
    assert (wt / "notes.txt").read_text() == "work in progress"


async def test_commit_all_skips_prompt_file(ws: GitWorkspace, remote: Path) -> None:
    wt = await task_worktree(ws, remote)
    (wt / ".task.md").write_text("# the prompt")
    assert await ws.commit_all(wt, "ORCH-1 developer: development") is None

    docs = wt / "docs" / "work-items" / WORK_ITEM
    docs.mkdir(parents=True)
    (docs / "01-brd.md").write_text("---\nstatus: ready\n---\n")
    sha = await ws.commit_all(wt, "ORCH-1 analyst: analysis")

    assert sha == await ws.head_sha(wt)
    tracked = await git("ls-tree", "-r", "--name-only", "HEAD", cwd=wt)
    assert "docs/work-items/ORCH-1/01-brd.md" in tracked.splitlines()
    assert ".task.md" not in tracked
    assert await git("log", "-1", "--format=%s|%an|%cn", cwd=wt) == (
        "ORCH-1 analyst: analysis|Conveyor|Conveyor"
    )
    assert await ws.commit_all(wt, "again") is None
    assert (wt / ".task.md").exists()


async def test_changed_files(ws: GitWorkspace, remote: Path) -> None:
    wt = await task_worktree(ws, remote)
    assert await changed_files(wt) == []
    (wt / ".task.md").write_text("prompt")
    (wt / "README.md").write_text("changed\n")
    (wt / "new dir").mkdir()
    (wt / "new dir" / "a b.txt").write_text("x")
    assert sorted(await changed_files(wt)) == ["README.md", "new dir/a b.txt"]


async def test_push_branch(ws: GitWorkspace, remote: Path) -> None:
    wt = await task_worktree(ws, remote)
    sha = await commit_file(wt, "feature.py", "print('hi')\n", "feature")

    res = await ws.push_branch(wt, BRANCH)

    assert res.ok, res.err
    assert await remote_rev(remote, BRANCH) == sha
    assert await remote_rev(remote, "main") != sha


async def test_restart_restores_pushed_branch(
    tmp_path: Path, ws: GitWorkspace, remote: Path
) -> None:
    wt = await task_worktree(ws, remote)
    sha = await commit_file(wt, "feature.py", "print('hi')\n", "feature")
    assert (await ws.push_branch(wt, BRANCH)).ok

    shutil.rmtree(wt)
    restored = await task_worktree(GitWorkspace(ws.workdir), remote)
    assert restored == wt
    assert await ws.head_sha(wt) == sha
    assert (wt / "feature.py").read_text() == "print('hi')\n"

    fresh = GitWorkspace(tmp_path / "another-machine")
    wt2 = await fresh.ensure_worktree(PROJECT, str(remote), "main", BRANCH, WORK_ITEM)
    assert await fresh.head_sha(wt2) == sha
    assert await git("symbolic-ref", "--short", "HEAD", cwd=wt2) == BRANCH


async def test_restart_keeps_unpushed_local_commits(ws: GitWorkspace, remote: Path) -> None:
    wt = await task_worktree(ws, remote)
    assert (await ws.push_branch(wt, BRANCH)).ok
    sha = await commit_file(wt, "later.py", "x = 1\n", "not pushed yet")

    shutil.rmtree(wt)
    await task_worktree(GitWorkspace(ws.workdir), remote)

    assert await ws.head_sha(wt) == sha


async def test_merge_to_main(ws: GitWorkspace, remote: Path) -> None:
    old_main = await remote_rev(remote, "main")
    wt = await task_worktree(ws, remote)
    head = await commit_file(wt, "feature.py", "print('hi')\n", "feature")

    res = await ws.merge_to_main(wt, BRANCH, "main", "Merge ORCH-1: Add login page")

    assert res.ok, res.error
    assert res.sha == await remote_rev(remote, "main")
    assert await remote_rev(remote, "main^1") == old_main
    assert await remote_rev(remote, "main^2") == head
    subject = await git("--git-dir", str(remote), "log", "-1", "--format=%s", "main")
    assert subject == "Merge ORCH-1: Add login page"
    assert await git("symbolic-ref", "--short", "HEAD", cwd=wt) == BRANCH
    assert await ws.head_sha(wt) == head
    assert await changed_files(wt) == []

    rerun = await ws.merge_to_main(wt, BRANCH, "main", "Merge ORCH-1: Add login page")
    assert rerun.ok
    assert rerun.sha == res.sha == await remote_rev(remote, "main")


async def test_merge_after_main_moved(tmp_path: Path, ws: GitWorkspace, remote: Path) -> None:
    wt = await task_worktree(ws, remote)
    head = await commit_file(wt, "feature.py", "print('hi')\n", "feature")
    other = await push_to_main(remote, tmp_path / "other", "other.py", "y = 2\n")

    res = await ws.merge_to_main(wt, BRANCH, "main", "Merge ORCH-1")

    assert res.ok, res.error
    assert await remote_rev(remote, "main^1") == other
    assert await remote_rev(remote, "main^2") == head
    files = await git("--git-dir", str(remote), "ls-tree", "--name-only", "main")
    assert {"feature.py", "other.py", "README.md"} <= set(files.splitlines())


class RacingWorkspace(GitWorkspace):
    """Another clone pushes to main right after each of our first `races` fetches, so our
    push of the merge is rejected by the real remote."""

    def __init__(self, workdir: Path, remote: Path, races: int) -> None:
        super().__init__(workdir)
        self.remote = remote
        self.races = races
        self.pushed: list[str] = []

    async def _fetch_worktree(self, worktree: Path) -> GitResult:
        res = await super()._fetch_worktree(worktree)
        if len(self.pushed) < self.races:
            n = len(self.pushed)
            clone = self.workdir.parent / f"racer-{n}"
            self.pushed.append(await push_to_main(self.remote, clone, f"race{n}.py", "x\n"))
        return res


async def test_merge_retries_when_push_loses_race(tmp_path: Path, remote: Path) -> None:
    ws = RacingWorkspace(tmp_path / "work", remote, races=2)
    wt = await task_worktree(ws, remote)
    head = await commit_file(wt, "feature.py", "print('hi')\n", "feature")

    res = await ws.merge_to_main(wt, BRANCH, "main", "Merge ORCH-1")

    assert res.ok, res.error
    assert res.sha == await remote_rev(remote, "main")
    assert await remote_rev(remote, "main^1") == ws.pushed[-1]
    assert await remote_rev(remote, "main^2") == head
    assert await git("symbolic-ref", "--short", "HEAD", cwd=wt) == BRANCH


async def test_merge_gives_up_when_main_keeps_moving(tmp_path: Path, remote: Path) -> None:
    ws = RacingWorkspace(tmp_path / "work", remote, races=100)
    wt = await task_worktree(ws, remote)
    await commit_file(wt, "feature.py", "print('hi')\n", "feature")

    res = await ws.merge_to_main(wt, BRANCH, "main", "Merge ORCH-1")

    assert not res.ok
    assert "kept moving" in (res.error or "")
    assert await remote_rev(remote, "main") == ws.pushed[-1]
    assert await git("symbolic-ref", "--short", "HEAD", cwd=wt) == BRANCH


async def test_merge_push_refused_by_remote(ws: GitWorkspace, remote: Path) -> None:
    main = await remote_rev(remote, "main")
    wt = await task_worktree(ws, remote)
    await commit_file(wt, "feature.py", "print('hi')\n", "feature")
    hook = remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'main is protected' >&2\nexit 1\n")
    hook.chmod(0o755)

    res = await ws.merge_to_main(wt, BRANCH, "main", "Merge ORCH-1")

    assert not res.ok
    assert "main is protected" in (res.error or "")
    assert await remote_rev(remote, "main") == main
    assert await git("symbolic-ref", "--short", "HEAD", cwd=wt) == BRANCH


async def test_merge_conflict(tmp_path: Path, ws: GitWorkspace, remote: Path) -> None:
    wt = await task_worktree(ws, remote)
    head = await commit_file(wt, "README.md", "line ONE from the task\nline two\n", "task edit")
    other = await push_to_main(
        remote, tmp_path / "other", "README.md", "line 1 upstream\nline two\n"
    )

    res = await ws.merge_to_main(wt, BRANCH, "main", "Merge ORCH-1")

    assert not res.ok
    assert res.conflict_files == ("README.md",)
    assert res.sha is None
    assert "README.md" in (res.error or "")
    assert await remote_rev(remote, "main") == other
    assert await git("symbolic-ref", "--short", "HEAD", cwd=wt) == BRANCH
    assert await ws.head_sha(wt) == head
    assert await changed_files(wt) == []


async def test_merge_refuses_dirty_worktree(ws: GitWorkspace, remote: Path) -> None:
    main = await remote_rev(remote, "main")
    wt = await task_worktree(ws, remote)
    (wt / "uncommitted.py").write_text("x = 1\n")

    res = await ws.merge_to_main(wt, BRANCH, "main", "Merge ORCH-1")

    assert not res.ok
    assert "uncommitted.py" in (res.error or "")
    assert await remote_rev(remote, "main") == main


async def test_detached_worktree_is_recovered(ws: GitWorkspace, remote: Path) -> None:
    wt = await task_worktree(ws, remote)
    await git("checkout", "-q", "--detach", "HEAD", cwd=wt)

    await task_worktree(ws, remote)

    assert await git("symbolic-ref", "--short", "HEAD", cwd=wt) == BRANCH


async def test_missing_remote(tmp_path: Path, ws: GitWorkspace) -> None:
    missing = tmp_path / "no-such-remote.git"
    with pytest.raises(GitError) as exc:
        await ws.ensure_worktree(PROJECT, str(missing), "main", BRANCH, WORK_ITEM)
    message = str(exc.value)
    assert "cannot clone" in message
    assert "no-such-remote.git" in message
    assert "\n" not in message
    assert not ws.repo_dir(PROJECT).exists()


async def test_missing_main_branch(ws: GitWorkspace, remote: Path) -> None:
    with pytest.raises(GitError, match="main branch 'trunk' not found"):
        await ws.ensure_worktree(PROJECT, str(remote), "trunk", BRANCH, WORK_ITEM)


async def test_credentials_never_in_errors(ws: GitWorkspace) -> None:
    url = "https://conveyor-bot:s3cr3t-t0ken@127.0.0.1:9/org/repo.git"
    with pytest.raises(GitError) as exc:
        await ws.ensure_worktree(PROJECT, url, "main", BRANCH, WORK_ITEM)
    message = str(exc.value)
    assert "s3cr3t-t0ken" not in message
    assert "conveyor-bot" not in message
    assert "127.0.0.1:9/org/repo.git" in message


async def test_unsafe_names_rejected(ws: GitWorkspace, remote: Path) -> None:
    with pytest.raises(GitError):
        await ws.ensure_worktree(PROJECT, str(remote), "main", BRANCH, "../escape")
    with pytest.raises(GitError):
        await ws.ensure_worktree(PROJECT, str(remote), "main", "--force", WORK_ITEM)
    with pytest.raises(GitError):
        await ws.ensure_worktree(PROJECT, str(remote), "main", "bad..branch", WORK_ITEM)


async def test_concurrent_worktrees_share_one_clone(ws: GitWorkspace, remote: Path) -> None:
    items = [f"ORCH-{n}" for n in range(2, 6)]
    paths = await asyncio.gather(
        *(
            ws.ensure_worktree(PROJECT, str(remote), "main", branch_name(item, "t"), item)
            for item in items
        )
    )
    for item, path in zip(items, paths, strict=True):
        assert await git("symbolic-ref", "--short", "HEAD", cwd=path) == branch_name(item, "t")


async def test_concurrent_calls_for_one_task(ws: GitWorkspace, remote: Path) -> None:
    first, second = await asyncio.gather(task_worktree(ws, remote), task_worktree(ws, remote))
    assert first == second
    assert await git("symbolic-ref", "--short", "HEAD", cwd=first) == BRANCH


async def test_remove_worktree(ws: GitWorkspace, remote: Path) -> None:
    wt = await task_worktree(ws, remote)

    await ws.remove_worktree(PROJECT, WORK_ITEM)
    await ws.remove_worktree(PROJECT, WORK_ITEM)
    await ws.remove_worktree("UNKNOWN", "X-1")
    await ws.remove_worktree(PROJECT, "../escape")

    assert not wt.exists()
    listed = await git("worktree", "list", cwd=ws.repo_dir(PROJECT))
    assert str(wt) not in listed
    assert await task_worktree(ws, remote) == wt


async def test_git_env_is_isolated(
    monkeypatch: pytest.MonkeyPatch, ws: GitWorkspace, remote: Path
) -> None:
    monkeypatch.setenv("GIT_DIR", "/nonexistent")
    monkeypatch.setenv("GIT_INDEX_FILE", "/nonexistent/index")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Someone Else")
    wt = await task_worktree(ws, remote)
    assert await ws.commit_all(wt, "x") is None
    (wt / "a.txt").write_text("a")
    assert await ws.commit_all(wt, "add a") is not None
    assert await git("log", "-1", "--format=%cn <%ce>", cwd=wt) == "Conveyor <conveyor@localhost>"


async def test_run_git_failure_and_timeout(tmp_path: Path) -> None:
    res = await run_git("rev-parse", "HEAD", cwd=tmp_path)
    assert not res.ok
    assert res.code != 0
    assert res.err

    slow = await run_git("-c", "alias.nap=!sleep 30", "nap", cwd=tmp_path, timeout_s=0.5)
    assert not slow.ok
    assert "timed out" in slow.err
